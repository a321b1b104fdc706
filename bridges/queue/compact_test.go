package queue

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/google/go-cmp/cmp"
)

// acceptSeq accepts m and returns its seq (the last held entry).
func acceptSeq(t *testing.T, q *Queue, m bridges.Message) uint64 {
	t.Helper()
	if err := q.Accept(context.Background(), m); err != nil {
		t.Fatalf("Accept %s %s: %v", m.Device, m.Payload, err)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ents[len(q.ents)-1].seq
}

// deliverUntil accepts messages of device "x" and acknowledges each, as the
// link does with the messages it gets past a stuck one, until done reports
// true (at most 5,000 messages). Every one must be accepted.
func deliverUntil(t *testing.T, q *Queue, done func() bool) {
	t.Helper()
	for i := 0; !done(); i++ {
		if i == 5000 {
			t.Fatal("5000 messages delivered and the condition never held")
		}
		seq := acceptSeq(t, q, msg("x", i))
		if err := q.Ack(seq); err != nil {
			t.Fatal(err)
		}
	}
}

// heldMessages drains q and returns its held messages by seq, fields as
// stored (Received in UTC).
func heldMessages(t *testing.T, q *Queue) map[uint64]bridges.Message {
	t.Helper()
	out := map[uint64]bridges.Message{}
	var last uint64
	for _, e := range drain(t, q) {
		if _, dup := out[e.Seq]; dup || e.Seq <= last {
			t.Fatalf("seq %d handed out twice or out of order (after %d)", e.Seq, last)
		}
		last = e.Seq
		m := e.Message
		m.Received = m.Received.UTC()
		out[e.Seq] = m
	}
	return out
}

// TestCompactionFreesDiskBehindAStuckMessage: one message that stays
// undelivered (its device stalled) while every other device's messages are
// delivered. Disk is freed from the front, so before compaction the queue
// filled up with delivered records behind it and refused every device for
// bytes (after 135 messages here). Now the head segment's held message
// is copied forward and the segments behind it freed: the queue takes 2,000
// messages, twelve times its bytes, stays within its bound, and still holds
// the stuck message once, as it was, also after a reopen.
func TestCompactionFreesDiskBehindAStuckMessage(t *testing.T) {
	const maxBytes = 8 << 10
	dir := t.TempDir()
	q, reg := open(t, dir, Options{MaxBytes: maxBytes, SegmentBytes: 2 << 10})
	stuck := msg("stuck", 0)
	seq := acceptSeq(t, q, stuck)
	n := 0
	deliverUntil(t, q, func() bool { n++; return n > 2000 })
	if st := q.Stats(); st.Bytes > maxBytes || st.Depth != 1 {
		t.Fatalf("stats after 2000 delivered behind a stuck message: %+v, want bytes <= %d and depth 1", st, maxBytes)
	}
	if c, m := metricValue(t, reg, "bastion_queue_compactions_total"), metricValue(t, reg, "bastion_queue_moved_total"); c < 1 || m < c {
		t.Fatalf("compactions %v, moved %v: want at least one, moving the stuck message each time", c, m)
	}
	want := map[uint64]bridges.Message{seq: normalize([]Entry{{Message: stuck}})[0]}
	if d := cmp.Diff(want, heldMessages(t, q)); d != "" {
		t.Fatalf("held (-want +got):\n%s", d)
	}
	q.Close()
	q2, _ := open(t, dir, Options{MaxBytes: maxBytes, SegmentBytes: 2 << 10})
	if d := cmp.Diff(want, heldMessages(t, q2)); d != "" {
		t.Fatalf("held after reopen (-want +got):\n%s", d)
	}
}

// TestCompactionKeepsOrderPerDevice: two devices each have a message held
// in the head segment and a later one held in the active segment. The
// compaction copies the first two into the active segment, after the later
// ones in the file; the queue still hands each device's messages out in
// seq order (the first before the later one), before and after a reopen.
func TestCompactionKeepsOrderPerDevice(t *testing.T) {
	dir := t.TempDir()
	// 7 KiB: compaction starts at 3.5 KiB, while the second segment is
	// active, so the copies go there, after the later messages.
	opts := Options{MaxBytes: 7 << 10, SegmentBytes: 2 << 10}
	q, reg := open(t, dir, opts)
	first := []bridges.Message{msg("d1", 0), msg("d2", 0)}
	later := []bridges.Message{msg("d1", 1), msg("d2", 1)}
	var want []bridges.Message
	var seqs []uint64
	for _, m := range first {
		seqs = append(seqs, acceptSeq(t, q, m))
		want = append(want, m)
	}
	deliverUntil(t, q, func() bool { return segCount(q) == 2 })
	for _, m := range later {
		seqs = append(seqs, acceptSeq(t, q, m))
		want = append(want, m)
	}
	deliverUntil(t, q, func() bool { return metricValue(t, reg, "bastion_queue_compactions_total") > 0 })

	q.mu.Lock()
	at := map[uint64]entry{}
	for _, e := range q.ents {
		at[e.seq] = e
	}
	q.mu.Unlock()
	moved, kept := at[seqs[0]], at[seqs[2]]
	if moved.seg != kept.seg || moved.off <= kept.off {
		t.Fatalf("d1's first message at %s:%d, its later one at %s:%d: the test needs the copy after the later one in the same segment",
			moved.seg.path, moved.off, kept.seg.path, kept.off)
	}
	check := func(q *Queue, when string) {
		t.Helper()
		es, err := q.Held(0, 100)
		if err != nil {
			t.Fatal(err)
		}
		var got []uint64
		for _, e := range es {
			got = append(got, e.Seq)
		}
		if d := cmp.Diff(seqs, got); d != "" {
			t.Fatalf("%s: seqs handed out (-want +got):\n%s", when, d)
		}
		if d := cmp.Diff(normalize([]Entry{{Message: want[0]}, {Message: want[1]}, {Message: want[2]}, {Message: want[3]}}), normalize(es)); d != "" {
			t.Fatalf("%s: messages (-want +got):\n%s", when, d)
		}
	}
	check(q, "after the compaction")
	q.Close()
	q2, _ := open(t, dir, opts)
	check(q2, "after reopen")
}

// compactionState makes, in dir, a queue whose head segment holds two
// devices' first messages among delivered ones, the segment after it only
// delivered ones, and a later segment the first device's next message, all
// with a MaxBytes so large that nothing is compacted. It returns the held
// messages by seq and the head segment's path.
func compactionState(t *testing.T, dir string) (map[uint64]bridges.Message, string) {
	t.Helper()
	q, _ := open(t, dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
	held := map[uint64]bridges.Message{}
	hold := func(m bridges.Message) { held[acceptSeq(t, q, m)] = normalize([]Entry{{Message: m}})[0] }
	hold(msg("d1", 0))
	hold(msg("d2", 0))
	deliverUntil(t, q, func() bool { return segCount(q) == 3 })
	hold(msg("d1", 1))
	deliverUntil(t, q, func() bool { return segCount(q) == 5 })
	head := q.segs[0].path
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	return held, head
}

// compactOpts reopens compactionState's queue with a MaxBytes whose half
// its segments pass: the first commit is followed by a compaction.
var compactOpts = Options{MaxBytes: 12 << 10, SegmentBytes: 2 << 10}

// copyDir copies every file of dir into a new directory: the disk as a
// crash at that moment would leave it, if every write made so far reached
// it (the test changes the copy to say otherwise).
func copyDir(t *testing.T, dir string) string {
	t.Helper()
	to := t.TempDir()
	names, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(dir, n.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, n.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// TestCompactionCrashAtEachStep: a crash at every step of a compaction
// loses and duplicates nothing. The disk is copied at each step (as it
// would be if the power went then) and each copy opened:
//   - copies written, not synced: they may have reached the disk whole,
//     not at all, or torn; the head segment is untouched, so each case
//     holds every message once (a torn copy is cut as any torn tail);
//   - copies synced, head segment not yet removed: both copies are on
//     disk, and recovery keeps one per seq (the copy: the head segment is
//     then removed at open);
//   - head segment removed: the copies alone.
//
// Each then takes a new message and holds it after the others.
func TestCompactionCrashAtEachStep(t *testing.T) {
	dir := t.TempDir()
	held, head := compactionState(t, dir)
	type image struct {
		dir     string
		seg     string
		off, n  int64
		headSeg bool // the head segment is in the image
	}
	images := map[compactStep]image{}
	q, reg := open(t, dir, compactOpts)
	q.compacting = func(step compactStep, seg *segment, off, n int64) {
		_, err := os.Stat(head)
		images[step] = image{dir: copyDir(t, dir), seg: filepath.Base(seg.path), off: off, n: n, headSeg: err == nil}
	}
	trigger := msg("t", 0)
	held[acceptSeq(t, q, trigger)] = normalize([]Entry{{Message: trigger}})[0]
	// The compaction follows the trigger's commit (a Close before it
	// would stop it); Close waits for the writer, and so for its last step.
	waitFor(t, "the compaction", func() bool { return metricValue(t, reg, "bastion_queue_compactions_total") > 0 })
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	for step, im := range images {
		if im.headSeg != (step != compactFreed) {
			// Only an error: the images below show what that loses.
			t.Errorf("at step %d the head segment is there: %t", step, im.headSeg)
		}
	}
	if len(images) != 3 {
		t.Fatalf("compaction reached %d of its 3 steps", len(images))
	}
	// damage writes b over the copies in the image, from at bytes into them.
	damage := func(im image, at int64, b []byte) image {
		d := copyDir(t, im.dir)
		f, err := os.OpenFile(filepath.Join(d, im.seg), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(b, im.off+at); err != nil {
			t.Fatal(err)
		}
		im.dir = d
		return im
	}
	w := images[compactWritten]
	cases := map[string]image{
		"written, whole":             w,
		"written, lost":              damage(w, 0, make([]byte, w.n)),
		"written, torn":              damage(w, w.n-5, make([]byte, 5)),
		"written, torn with garbage": damage(w, w.n/3, []byte{0xff, 0xff, 0xff}),
		"synced":                     images[compactSynced],
		"freed":                      images[compactFreed],
	}
	// The disk's corruption of the record before the copies (the
	// trigger's, in the same segment): recovery steps over it to the
	// copies (resync takes moved records too) and keeps them; only the
	// damaged message is lost.
	f := images[compactFreed]
	corrupt := copyDir(t, f.dir)
	triggerSeq := slices.Max(slices.Collect(maps.Keys(held)))
	flipChecksum(t, filepath.Join(corrupt, f.seg), triggerSeq)
	cases["freed, record before the copies corrupt"] = image{dir: corrupt}
	for name, im := range cases {
		t.Run(name, func(t *testing.T) {
			held := maps.Clone(held)
			if im.dir == corrupt {
				delete(held, triggerSeq)
			}
			q, _ := open(t, im.dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
			if d := cmp.Diff(held, heldMessages(t, q)); d != "" {
				t.Fatalf("held after the crash (-want +got):\n%s", d)
			}
			if name == "synced" {
				if _, err := os.Stat(filepath.Join(im.dir, filepath.Base(head))); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("head segment after open: %v; want it removed (its held messages are the copies now)", err)
				}
			}
			want := maps.Clone(held)
			m := msg("after", 0)
			want[acceptSeq(t, q, m)] = normalize([]Entry{{Message: m}})[0]
			q.Close()
			q2, _ := open(t, im.dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
			if d := cmp.Diff(want, heldMessages(t, q2)); d != "" {
				t.Fatalf("held after a new message and a reopen (-want +got):\n%s", d)
			}
		})
	}
}

// TestCompactionFailedFsync: the fsync of the copies fails. Nothing is
// removed, the queue stops as after a commit's failed fsync, and a reopen
// holds every message once.
func TestCompactionFailedFsync(t *testing.T) {
	dir := t.TempDir()
	held, head := compactionState(t, dir)
	var fail atomic.Bool
	opts := compactOpts
	opts.Sync = func(f *os.File) error {
		if fail.Load() {
			return errors.New("EIO from the test")
		}
		return f.Sync()
	}
	q, reg := open(t, dir, opts)
	q.compacting = func(step compactStep, _ *segment, _, _ int64) {
		if step == compactWritten {
			fail.Store(true)
		}
	}
	trigger := msg("t", 0)
	held[acceptSeq(t, q, trigger)] = normalize([]Entry{{Message: trigger}})[0]
	waitFor(t, "the queue stops after the compaction's fsync failed", func() bool { return q.Stats().Err != nil })
	if err := q.Accept(context.Background(), msg("refused", 0)); !errors.Is(err, bridges.ErrDiskFailed) {
		t.Fatalf("Accept after the failed fsync: %v, want ErrDiskFailed", err)
	}
	if _, err := os.Stat(head); err != nil {
		t.Fatalf("head segment after the failed fsync: %v, want it kept", err)
	}
	if got := metricValue(t, reg, "bastion_queue_compactions_total"); got != 0 {
		t.Fatalf("compactions %v, want 0", got)
	}
	q.Close()
	q2, _ := open(t, dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
	if d := cmp.Diff(held, heldMessages(t, q2)); d != "" {
		t.Fatalf("held after reopen (-want +got):\n%s", d)
	}
}

// TestCompactionKeepsAge: a moved message keeps its received time, so the
// age bound counts from when the gateway received it, not from the move:
// the queue refuses by age when the stuck message is MaxAge old, and its
// age is the same after a reopen.
func TestCompactionKeepsAge(t *testing.T) {
	var now atomic.Int64
	t0 := time.Unix(1700000000, 0)
	now.Store(t0.UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	dir := t.TempDir()
	opts := Options{MaxBytes: 8 << 10, SegmentBytes: 2 << 10, MaxAge: time.Hour, Now: clock}
	q, reg := open(t, dir, opts)
	stuck := msg("stuck", 0)
	stuck.Received = time.Time{} // stamped by the clock: t0
	acceptSeq(t, q, stuck)
	now.Add(int64(50 * time.Minute))
	deliverUntil(t, q, func() bool { return metricValue(t, reg, "bastion_queue_compactions_total") > 0 })
	if got := q.Stats().Oldest; !got.Equal(t0) {
		t.Fatalf("oldest after the compaction %v, want %v (when it was received)", got, t0)
	}
	now.Add(int64(11 * time.Minute))
	if err := q.Accept(context.Background(), msg("late", 0)); !errors.Is(err, bridges.ErrQueueFull) || !strings.Contains(err.Error(), "older than") {
		t.Fatalf("Accept 61 minutes after the stuck message: %v, want refused by age", err)
	}
	q.Close()
	q2, _ := open(t, dir, opts)
	if got := q2.Stats().Oldest; !got.Equal(t0) {
		t.Fatalf("oldest after reopen %v, want %v", got, t0)
	}
}

// TestCompactionOfV1Segment: a head segment written before the salt (v1,
// unkeyed) is compacted like any other: its held message is copied into a
// keyed segment and the old file removed; the message is held once, as it
// was, also after a reopen. A moved record in an unkeyed segment is not
// the queue's (only keyed segments get them) and is not taken.
func TestCompactionOfV1Segment(t *testing.T) {
	dir := t.TempDir()
	data := []byte(segMagicV1)
	var acked []uint64
	for i := range 30 {
		m := msg("old", i)
		data = appendMsg(data, uint64(100+i), &m)
		if i > 0 {
			acked = append(acked, uint64(100+i))
		}
	}
	data = appendAck(data, acked)
	// What a device could put in a payload: a moved record, unkeyed.
	forged := msg("forged", 0)
	data = appendMoved(data, appendMsg(nil, 50, &forged)) // below the segment's base, as a moved record's is
	m := msg("old", 30)
	data = appendMsg(data, 130, &m)
	data = appendAck(data, []uint64{130})
	data = append(data, make([]byte, 4<<10)...)
	old := segName(dir, 100)
	if err := os.WriteFile(old, data, 0o600); err != nil {
		t.Fatal(err)
	}
	opts := Options{MaxBytes: 3 << 10, SegmentBytes: 1 << 10}
	q, reg := open(t, dir, opts)
	want := map[uint64]bridges.Message{100: normalize([]Entry{{Message: msg("old", 0)}})[0]}
	trigger := msg("t", 0)
	want[acceptSeq(t, q, trigger)] = normalize([]Entry{{Message: trigger}})[0]
	waitFor(t, "the v1 segment is compacted", func() bool { return metricValue(t, reg, "bastion_queue_compactions_total") > 0 })
	if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("v1 segment after the compaction: %v, want it removed", err)
	}
	if d := cmp.Diff(want, heldMessages(t, q)); d != "" {
		t.Fatalf("held (-want +got):\n%s", d)
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	for _, s := range segs {
		b, _ := os.ReadFile(s)
		if !strings.HasPrefix(string(b), segMagic) {
			t.Errorf("%s is not keyed", s)
		}
	}
	q2, _ := open(t, dir, opts)
	if d := cmp.Diff(want, heldMessages(t, q2)); d != "" {
		t.Fatalf("held after reopen (-want +got):\n%s", d)
	}
}

// flipChecksum breaks the checksum of the message record for seq in the
// segment file path.
func flipChecksum(t *testing.T, path string, seq uint64) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off, key := segStart(data)
	for off < len(data) {
		rec, n, err := decodeRecordIn(data[off:], key, nil)
		if err != nil {
			break
		}
		if rec.kind == kindMsg && rec.seq == seq {
			data[off+4] ^= 0xff
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			return
		}
		off += n
	}
	t.Fatalf("no record for seq %d in %s", seq, path)
}

// TestCompactionWhenFullRotatesAndResumes: the queue is full by bytes and
// takes no commit, so only a refusal asks for a compaction; the active
// segment has no room for the copies, so the compaction starts a new
// segment for them (named after the next seq); their fsync fails, which
// stops the queue. Resuming must start yet another segment, whose name
// cannot be the next seq (taken by the copies' segment): before, every
// resume failed on it and the queue never accepted again. After the
// resume the queue accepts, compacts, and holds every message once.
func TestCompactionWhenFullRotatesAndResumes(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
	held := map[uint64]bridges.Message{}
	hold := func(q *Queue, m bridges.Message) { held[acceptSeq(t, q, m)] = normalize([]Entry{{Message: m}})[0] }
	hold(q, msg("d1", 0))
	hold(q, msg("d2", 0))
	deliverUntil(t, q, func() bool { return segCount(q) == 3 })
	hold(q, msg("d1", 1))
	// The active segment all but full: no room for the two copies.
	deliverUntil(t, q, func() bool { return segCount(q) >= 4 && activeSize(q) > 2<<10-95 })
	full, active := q.Stats().Bytes, activePath(q)
	q.Close()

	var fail atomic.Bool
	opts := Options{MaxBytes: full, SegmentBytes: 2 << 10, resumeAfter: time.Millisecond}
	opts.Sync = func(f *os.File) error {
		if fail.Load() {
			return errors.New("EIO from the test")
		}
		return f.Sync()
	}
	q, reg := open(t, dir, opts)
	var copies string
	q.compacting = func(step compactStep, seg *segment, _, _ int64) {
		if step == compactWritten && copies == "" {
			copies = seg.path
			fail.Store(true) // this fsync only
		}
	}
	if err := q.Accept(context.Background(), msg("refused", 0)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("Accept into the full queue: %v, want ErrQueueFull", err)
	}
	waitFor(t, "the copies' fsync fails and stops the queue", func() bool { return q.Stats().Err != nil })
	fail.Store(false)
	waitFor(t, "the queue resumes", func() bool { return q.Stats().Err == nil })
	// Still full (the failed copies count too): the refusal asks for the
	// compaction again, and then the queue has room.
	if err := q.Accept(context.Background(), msg("refused", 1)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("Accept after the resume: %v, want ErrQueueFull", err)
	}
	waitFor(t, "a compaction after the resume", func() bool { return metricValue(t, reg, "bastion_queue_compactions_total") > 0 })
	hold(q, msg("after", 0))
	if copies == "" || copies == active {
		t.Fatalf("copies written to %q, want a new segment (the active one, %s, had no room)", copies, active)
	}
	if d := cmp.Diff(held, heldMessages(t, q)); d != "" {
		t.Fatalf("held (-want +got):\n%s", d)
	}
	q.Close()
	q2, _ := open(t, dir, Options{MaxBytes: 1 << 20, SegmentBytes: 2 << 10})
	if d := cmp.Diff(held, heldMessages(t, q2)); d != "" {
		t.Fatalf("held after reopen (-want +got):\n%s", d)
	}
}

// TestCompactionWhileTheLinkReads: a reader that works like the link
// (NextInto past what it has, acknowledging all but one device's
// messages) runs while a writer accepts 2,000 messages behind that
// device's one stuck message, so that compactions move it while reads are
// planned and made without the lock. Every message is handed out once, in
// seq order; none is refused; the stuck one is held at the end, as it was.
func TestCompactionWhileTheLinkReads(t *testing.T) {
	q, reg := open(t, t.TempDir(), Options{MaxBytes: 8 << 10, SegmentBytes: 2 << 10})
	ctx, cancel := context.WithCancel(context.Background())
	stuck := msg("stuck", 0)
	stuckSeq := acceptSeq(t, q, stuck)
	const n = 2000
	got := make(chan []uint64, 1)
	go func() {
		var seqs []uint64
		var es []Entry
		var buf []byte
		var after uint64
		for {
			var err error
			es, buf, err = q.NextInto(ctx, after, 64, es, buf)
			if err != nil {
				got <- seqs
				return
			}
			for _, e := range es {
				seqs = append(seqs, e.Seq)
				after = e.Seq
				if e.Device != "stuck" {
					q.Ack(e.Seq)
				}
			}
		}
	}()
	var want []uint64
	want = append(want, stuckSeq)
	for i := range n {
		want = append(want, acceptSeq(t, q, msg("x", i)))
	}
	waitFor(t, "every message handed out", func() bool {
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.depth == 1
	})
	cancel()
	seqs := <-got
	if d := cmp.Diff(want, seqs); d != "" {
		t.Fatalf("seqs handed out (-want +got):\n%s", d)
	}
	if c := metricValue(t, reg, "bastion_queue_compactions_total"); c < 1 {
		t.Fatalf("compactions %v, want some", c)
	}
	es, err := q.Held(0, 10)
	if err != nil || len(es) != 1 || es[0].Seq != stuckSeq {
		t.Fatalf("held at the end: %+v, %v; want the stuck message alone", es, err)
	}
	if d := cmp.Diff(normalize([]Entry{{Message: stuck}}), normalize(es)); d != "" {
		t.Fatalf("stuck message (-want +got):\n%s", d)
	}
}

package queue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// heldSync is one fsync the test holds until it sends on release: nil
// runs the real fsync, an error fails it.
type heldSync struct {
	f       *os.File
	release chan error // capacity 1
}

// gatedSyncs holds every fsync of the queue until the test releases it;
// once the test ends (cleanup, before the queue's Close) every fsync runs
// unheld, so a failing test does not hang in Close.
type gatedSyncs struct {
	started chan *heldSync
	done    chan struct{}
}

func newGatedSyncs() *gatedSyncs {
	return &gatedSyncs{started: make(chan *heldSync, 16), done: make(chan struct{})}
}

// openGated opens a queue whose fsyncs g holds.
func openGated(t *testing.T, dir string, o Options) (*Queue, *prometheus.Registry, *gatedSyncs) {
	g := newGatedSyncs()
	o.Sync = g.sync
	q, reg := open(t, dir, o)
	t.Cleanup(func() { close(g.done) })
	return q, reg, g
}

func (g *gatedSyncs) sync(f *os.File) error {
	h := &heldSync{f: f, release: make(chan error, 1)}
	select {
	case g.started <- h:
	case <-g.done:
		return f.Sync()
	}
	select {
	case err := <-h.release:
		if err != nil {
			return err
		}
	case <-g.done:
	}
	return f.Sync()
}

// next waits (bounded) for the next fsync to start.
func (g *gatedSyncs) next(t *testing.T, what string) *heldSync {
	t.Helper()
	select {
	case h := <-g.started:
		return h
	case <-time.After(10 * time.Second):
		t.Fatalf("no fsync started within 10s for %s", what)
		return nil
	}
}

// none checks that no fsync starts within d (a negative: bounded wait).
func (g *gatedSyncs) none(t *testing.T, d time.Duration, why string) {
	t.Helper()
	select {
	case <-g.started:
		t.Fatalf("an fsync started: %s", why)
	case <-time.After(d):
	}
}

// quiet checks that nothing is reported on ch within d.
func quiet(t *testing.T, ch <-chan error, d time.Duration, why string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("reported (err %v): %s", err, why)
	case <-time.After(d):
	}
}

func admit(t *testing.T, q *Queue, m bridges.Message) <-chan error {
	t.Helper()
	ch, err := q.AcceptAsync(context.Background(), m)
	if err != nil || ch == nil {
		t.Fatalf("AcceptAsync: channel %v, err %v", ch, err)
	}
	return ch
}

func result(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("no durability report within 10s")
		return nil
	}
}

// TestOneFsyncAtATime: the next fsync starts only after the previous
// returned (the plain group commit; a pipelined one, with a second fsync
// overlapping the first, measured no gain on this disk and was removed).
func TestOneFsyncAtATime(t *testing.T) {
	q, _, g := openGated(t, t.TempDir(), Options{})
	a := admit(t, q, msg("d", 0))
	ha := g.next(t, "the first batch")
	b := admit(t, q, msg("d", 1))
	g.none(t, 100*time.Millisecond, "a second commit while the first is in fsync")
	ha.release <- nil
	g.next(t, "the second batch").release <- nil
	for _, ch := range []<-chan error{a, b} {
		if err := result(t, ch); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFailedFsyncFailsLaterCommits: when an fsync fails, the batch that
// gathered meanwhile is refused too without being written (after a failed
// fsync the page cache's state of the file is unknown), and the queue
// admits nothing more. Each of those errors is bridges.ErrDiskFailed, not
// ErrQueueFull, so that the transports count them as the disk's fault.
func TestFailedFsyncFailsLaterCommits(t *testing.T) {
	q, reg, g := openGated(t, t.TempDir(), Options{})
	a := admit(t, q, msg("d", 0))
	ha := g.next(t, "the first batch")
	b := admit(t, q, msg("d", 1))
	fs0 := metricValue(t, reg, "bastion_queue_fsyncs_total")
	if v := metricValue(t, reg, "bastion_queue_stopped"); v != 0 || q.Stats().Err != nil {
		t.Fatalf("stopped before any failure: metric %v, Stats().Err %v", v, q.Stats().Err)
	}
	ha.release <- errors.New("EIO from the test")
	diskErr := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, bridges.ErrDiskFailed) || errors.Is(err, bridges.ErrQueueFull) {
			t.Errorf("%s: %v, want bridges.ErrDiskFailed (and not ErrQueueFull)", what, err)
		}
	}
	if err := result(t, a); err == nil {
		t.Fatal("first batch reported durable after its fsync failed")
	} else {
		diskErr("first batch", err)
	}
	if err := result(t, b); err == nil {
		t.Fatal("second batch reported durable after an earlier fsync failed")
	} else {
		diskErr("second batch", err)
	}
	if fs := metricValue(t, reg, "bastion_queue_fsyncs_total") - fs0; fs != 1 {
		t.Errorf("%v fsyncs after the failed one started, want only it (1)", fs)
	}
	if _, err := q.AcceptAsync(context.Background(), msg("d", 2)); err == nil {
		t.Fatal("queue admitted a message after a failed fsync")
	} else {
		diskErr("admission after the failure", err)
	}
	// Shown where an operator looks: metrics and bastionctl status.
	if v := metricValue(t, reg, "bastion_queue_stopped"); v != 1 {
		t.Errorf("bastion_queue_stopped = %v after a failed fsync, want 1", v)
	}
	if err := q.Stats().Err; err == nil || !strings.Contains(err.Error(), "EIO from the test") {
		t.Errorf("Stats().Err = %v, want the fsync's error", err)
	}
}

// TestFailedFsyncResumesOnNewSegment: after a failed fsync the queue
// refuses messages for a while, then accepts again, writing to a new
// segment (nothing is written after the failed commit's pages), and what it
// acknowledges then survives a reopen, in order after what came before.
func TestFailedFsyncResumesOnNewSegment(t *testing.T) {
	dir := t.TempDir()
	q, reg, g := openGated(t, dir, Options{resumeAfter: 100 * time.Millisecond})
	a := admit(t, q, msg("d", 0))
	g.next(t, "the first batch").release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	failNextFsync(t, q, g, msg("d", 1))
	if _, err := q.AcceptAsync(context.Background(), msg("d", 2)); err == nil {
		t.Fatal("admitted right after a failed fsync")
	}
	deadline := time.Now().Add(10 * time.Second)
	for q.Stats().Err != nil {
		if time.Now().After(deadline) {
			t.Fatal("still refusing 10 s after a failed fsync (resume after 100 ms)")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if v := metricValue(t, reg, "bastion_queue_stopped"); v != 0 {
		t.Fatalf("bastion_queue_stopped = %v after resuming, want 0", v)
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 2 {
		t.Fatalf("segments after resuming = %v, want a new one beside the first", segs)
	}
	c := admit(t, q, msg("d", 3))
	h := g.next(t, "the batch after resuming")
	if h.f.Name() == segs[0] {
		t.Fatalf("commit after resuming went to the segment of the failed fsync, %s", h.f.Name())
	}
	h.release <- nil
	if err := result(t, c); err != nil {
		t.Fatalf("accept after resuming: %v", err)
	}
	// A disk that fails again before any commit succeeded waits twice as
	// long before the next resume (each costs a new segment); one that
	// committed since starts over.
	d := admit(t, q, msg("d", 4))
	g.next(t, "a failing batch after a good one").release <- errors.New("EIO again")
	result(t, d)
	q.mu.Lock()
	w := q.resumeWait
	q.mu.Unlock()
	if w != 100*time.Millisecond {
		t.Fatalf("pause before resuming after a good commit = %v, want 100ms", w)
	}
	for q.Stats().Err != nil {
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("no second resume")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e := admit(t, q, msg("d", 5))
	g.next(t, "failing right after resuming").release <- errors.New("EIO at once")
	result(t, e)
	q.mu.Lock()
	w = q.resumeWait
	q.mu.Unlock()
	if w != 200*time.Millisecond {
		t.Fatalf("pause before resuming after failing again at once = %v, want 200ms", w)
	}
	q.Close()
	q2, _ := open(t, dir, Options{})
	var got []string
	for _, e := range drain(t, q2) {
		got = append(got, string(e.Payload))
	}
	// The batches whose fsync failed were never acknowledged: they may be
	// there (the test's fsyncs failed only in name) or not; a and the
	// message acknowledged after resuming must be, and all in order.
	if len(got) < 2 || got[0] != `{"i":0}` || !slices.Contains(got, `{"i":3}`) {
		t.Fatalf("after reopen: %v, want {\"i\":0} first and {\"i\":3} kept", got)
	}
	if !slices.IsSorted(got) { // one digit each: text order is number order
		t.Fatalf("after reopen, out of order: %v", got)
	}
}

// TestFlushWithoutSyncLeavesBatch: the writer's flush of delivered-marks
// (no fsync, when the marks' timer fires) must not take a batch that
// arrived meanwhile: that batch would be told durable without an fsync.
func TestFlushWithoutSyncLeavesBatch(t *testing.T) {
	q, _, g := openGated(t, t.TempDir(), Options{})
	a := admit(t, q, msg("d", 0))
	ha := g.next(t, "the first batch")
	// The writer is in a's fsync; b waits for the next commit.
	b := admit(t, q, msg("d", 1))
	q.flush(false) // as the marks' timer would, racing with b's admission
	quiet(t, b, 100*time.Millisecond, "a batch written by a flush without fsync")
	ha.release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	hb := g.next(t, "the second batch")
	quiet(t, b, 50*time.Millisecond, "the second batch while its fsync is held")
	hb.release <- nil
	if err := result(t, b); err != nil {
		t.Fatal(err)
	}
}

// TestRotationWaitsForSyncs: a batch that starts a new segment waits until
// the commit of the old one is out of fsync. Otherwise a fully delivered
// old segment (the link may send and get the PUBACK before the fsync
// returns) could be closed and removed under its own fsync, which then
// fails and stops the queue. (The writer runs one commit at a time, so
// this holds by construction; the test stays to keep it so.)
func TestRotationWaitsForSyncs(t *testing.T) {
	dir := t.TempDir()
	q, _, g := openGated(t, dir, Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20})
	ctx := context.Background()
	a := admit(t, q, msg("d", 0))
	ha := g.next(t, "the first batch")
	es, err := q.Next(ctx, 0, 10)
	if err != nil || len(es) != 1 {
		t.Fatalf("Next: %v, %v", es, err)
	}
	if err := q.Ack(es[0].Seq); err != nil { // delivered before its fsync returned
		t.Fatal(err)
	}
	big := msg("d", 1)
	big.Payload = make([]byte, 5<<10) // does not fit the first segment
	b := admit(t, q, big)
	select {
	case hb := <-g.started:
		// Rotated with the old segment's fsync still running: a delivered
		// mark for b now reclaims the old segment under that fsync.
		es, err := q.Next(ctx, es[0].Seq, 10)
		if err == nil && len(es) == 1 {
			q.Ack(es[0].Seq)
		}
		ha.release <- nil
		hb.release <- nil
		t.Fatalf("the batch starting segment %s was written while the previous segment's fsync ran (first batch: %v)", filepath.Base(hb.f.Name()), result(t, a))
	case <-time.After(100 * time.Millisecond):
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 1 {
		t.Fatalf("segments while the first fsync is held: %v, want 1", segs)
	}
	ha.release <- nil
	if err := result(t, a); err != nil {
		t.Fatalf("first batch: %v", err)
	}
	hb := g.next(t, "the batch in the new segment")
	if filepath.Base(hb.f.Name()) == filepath.Base(segs[0]) {
		t.Fatalf("second batch synced %s, want a new segment", hb.f.Name())
	}
	hb.release <- nil
	if err := result(t, b); err != nil {
		t.Fatalf("second batch: %v", err)
	}
}

// TestCommitsDoNotGrowSegment: a segment is preallocated (zeros up to
// SegmentBytes), so commits overwrite allocated blocks and never change the
// file's size (an append's fsync also writes the inode); the zero tail
// reads back as the clean end, across reopens, without a cut.
func TestCommitsDoNotGrowSegment(t *testing.T) {
	dir := t.TempDir()
	const segBytes = 64 << 10
	sizes := func() []int64 {
		segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
		var out []int64
		for _, s := range segs {
			fi, err := os.Stat(s)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, fi.Size())
		}
		return out
	}
	q, _ := open(t, dir, Options{SegmentBytes: segBytes, MaxBytes: 1 << 20})
	for i := range 10 {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	if diff := cmp.Diff([]int64{segBytes}, sizes()); diff != "" {
		t.Fatalf("segment sizes after 10 commits (-want +got):\n%s", diff)
	}
	q.Close()
	for round, n := range []int{10, 15} {
		q, reg := open(t, dir, Options{SegmentBytes: segBytes, MaxBytes: 1 << 20})
		if c := metricValue(t, reg, "bastion_queue_records_cut_total"); c != 0 {
			t.Fatalf("reopen %d: the zero tail was cut (%v)", round, c)
		}
		if got := len(drain(t, q)); got != n {
			t.Fatalf("reopen %d: %d messages, want %d", round, got, n)
		}
		for i := range 5 {
			if err := q.Accept(context.Background(), msg("b", i)); err != nil {
				t.Fatal(err)
			}
		}
		q.Close()
		if diff := cmp.Diff([]int64{segBytes}, sizes()); diff != "" {
			t.Fatalf("reopen %d: segment sizes after more commits (-want +got):\n%s", round, diff)
		}
	}
}

// TestTornCreationRemoved: a preallocated segment whose creation was cut
// before its first sync (the header's sector not written: zeros, or part
// of the magic, then zeros) never held a message; Open removes it instead
// of refusing to start. Anything else without the magic is still refused.
func TestTornCreationRemoved(t *testing.T) {
	for name, data := range map[string][]byte{
		"all zeros":            make([]byte, 8<<10),
		"part magic, zeros":    append([]byte(segMagic[:4]), make([]byte, 8<<10)...),
		"part magic, no tail":  []byte(segMagic[:5]),
		"magic, part salt":     []byte(segMagic + "\x01\x02\x03"),
		"part v1 magic, zeros": append([]byte(segMagicV1[:7]), make([]byte, 8<<10)...),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			torn := filepath.Join(dir, "00000000000000000007.seg")
			if err := os.WriteFile(torn, data, 0o600); err != nil {
				t.Fatal(err)
			}
			q, _ := open(t, dir, Options{})
			if _, err := os.Stat(torn); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("torn segment still there: %v", err)
			}
			if err := q.Accept(context.Background(), msg("a", 0)); err != nil {
				t.Fatal(err)
			}
		})
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "00000000000000000007.seg"), append([]byte("NOTQUEUE"), make([]byte, 64)...), 0o600); err != nil {
		t.Fatal(err)
	}
	if q, err := Open(dir, Options{}, discard, nil); err == nil {
		q.Close()
		t.Fatal("Open accepted a segment with a foreign header")
	}
}

// TestSmallMaxBytesOpens: the gateway accepts upstream.queue_max_bytes from
// 1 MiB; below the 4 MiB default segment the segment size follows MaxBytes
// (a quarter of it) instead of Open refusing, and the preallocated files
// stay within it.
func TestSmallMaxBytesOpens(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{MaxBytes: 1 << 20})
	if err := q.Accept(context.Background(), msg("a", 0)); err != nil {
		t.Fatal(err)
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	var total int64
	for _, s := range segs {
		fi, err := os.Stat(s)
		if err != nil {
			t.Fatal(err)
		}
		total += fi.Size()
	}
	if total != 256<<10 {
		t.Errorf("files take %d bytes, want one segment of 256 KiB", total)
	}
}

// TestAdmitDuringSegmentCreation: starting a segment writes SegmentBytes of
// zeros and syncs them (milliseconds); devices' messages are admitted
// meanwhile instead of waiting for the queue's lock.
func TestAdmitDuringSegmentCreation(t *testing.T) {
	q, _ := open(t, t.TempDir(), Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20})
	if err := q.Accept(context.Background(), msg("d", -1)); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan string, 1), make(chan struct{})
	q.creating = func(f *os.File) {
		if filepath.Base(f.Name()) == spareName {
			return // the next one, prepared ahead (TestRotationUsesPreparedSegment)
		}
		entered <- filepath.Base(f.Name())
		<-release
	}
	big := msg("d", 0)
	big.Payload = make([]byte, 5<<10) // does not fit the first segment
	b := admit(t, q, big)
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no segment started for a batch that does not fit")
	}
	admitted := make(chan (<-chan error), 1)
	go func() {
		ch, err := q.AcceptAsync(context.Background(), msg("d", 1))
		if err != nil {
			t.Error(err)
		}
		admitted <- ch
	}()
	var c <-chan error
	select {
	case c = <-admitted:
	case <-time.After(5 * time.Second):
		close(release)
		<-admitted
		t.Fatal("admission waited for the new segment's creation")
	}
	close(release)
	for _, ch := range []<-chan error{b, c} {
		if err := result(t, ch); err != nil {
			t.Fatal(err)
		}
	}
	got := normalize(drain(t, q))
	if len(got) != 3 || len(got[1].Payload) != 5<<10 {
		t.Fatalf("held %d messages, want the first, the big one, then the last", len(got))
	}
}

// TestFirstBatchLargerThanSegment: a batch that does not fit an empty
// segment is written there instead of starting a new segment, which would
// have the empty one's name (both named after the next seq) and fail.
func TestFirstBatchLargerThanSegment(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20})
	big := msg("d", 0)
	big.Payload = make([]byte, 5<<10)
	if err := q.Accept(context.Background(), big); err != nil {
		t.Fatalf("Accept of a batch larger than an empty segment: %v", err)
	}
	if err := q.Accept(context.Background(), msg("d", 1)); err != nil {
		t.Fatal(err)
	}
	if got := len(drain(t, q)); got != 2 {
		t.Fatalf("held %d, want 2", got)
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 2 {
		t.Errorf("segments %v, want the first (with the big batch) and a new one", segs)
	}
}

// TestGatherAfterABatch: the adaptive group commit. A lone writer (every
// batch one message) is never held back, even with an hour allowed; after
// a commit of four, one message waits for the batch to grow back to four,
// which then share one fsync.
func TestGatherAfterABatch(t *testing.T) {
	q, reg, g := openGated(t, t.TempDir(), Options{})
	q.mu.Lock()
	q.gatherFor = time.Hour
	q.mu.Unlock()
	check := func(chs ...<-chan error) {
		t.Helper()
		for _, ch := range chs {
			if err := result(t, ch); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := range 3 {
		a := admit(t, q, msg("d", i))
		g.next(t, "a lone message's commit").release <- nil
		check(a)
	}
	b := admit(t, q, msg("d", 3))
	hb := g.next(t, "one message")
	var four []<-chan error
	for i := range 4 {
		four = append(four, admit(t, q, msg("d", 4+i)))
	}
	hb.release <- nil
	g.next(t, "the four admitted during the last fsync").release <- nil
	check(append(four, b)...)

	fs0 := metricValue(t, reg, "bastion_queue_fsyncs_total")
	var gathered []<-chan error
	for i := range 3 {
		gathered = append(gathered, admit(t, q, msg("e", i)))
		g.none(t, 50*time.Millisecond, "a commit of fewer than the last batch's four while gathering")
	}
	gathered = append(gathered, admit(t, q, msg("e", 3)))
	g.next(t, "the gathered four").release <- nil
	check(gathered...)
	if fs := metricValue(t, reg, "bastion_queue_fsyncs_total") - fs0; fs != 1 {
		t.Errorf("%v fsyncs for the four gathered messages, want 1", fs)
	}
}

// TestFailedResumeTriesAgain: when resume cannot make its new segment
// durable (here the segment's sync fails), the next resume, with the same
// base (nothing is admitted meanwhile), must not find that segment's name
// taken. Before, the failed file stayed and every later resume failed on
// it with EEXIST: refused until bastiond restarted.
func TestFailedResumeTriesAgain(t *testing.T) {
	dir := t.TempDir()
	q, _, g := openGated(t, dir, Options{resumeAfter: 20 * time.Millisecond})
	a := admit(t, q, msg("d", 0))
	g.next(t, "the first batch").release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	var failing atomic.Bool
	failing.Store(true)
	failed := make(chan string, 1)
	q.creating = func(f *os.File) {
		if filepath.Base(f.Name()) != spareName && failing.Load() {
			f.Close() // its sync fails
			failing.Store(false)
			failed <- f.Name()
		}
	}
	failNextFsync(t, q, g, msg("d", 1))
	select {
	case name := <-failed:
		t.Logf("resume's segment %s failed its sync", filepath.Base(name))
	case <-time.After(10 * time.Second):
		t.Fatal("no resume tried a new segment within 10 s")
	}
	deadline := time.Now().Add(5 * time.Second)
	for q.Stats().Err != nil {
		if time.Now().After(deadline) {
			t.Fatalf("still refusing 5 s after a resume failed once (next tries after 40 ms): %v", q.Stats().Err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := admit(t, q, msg("d", 2))
	g.next(t, "the batch after resuming").release <- nil
	if err := result(t, c); err != nil {
		t.Fatalf("accept after resuming: %v", err)
	}
}

// TestDiskErrorRefusalsCounted: every message refused because of the disk,
// after it was admitted or at its admission, is counted in
// bastion_queue_refusals_total{reason="disk_error"}: a batch whose new
// segment could not be made, the batch whose fsync failed, the batch
// refused because of that failure, and a message arriving while the queue
// is stopped (by either failure). Before, none of them was counted.
func TestDiskErrorRefusalsCounted(t *testing.T) {
	q, _, g := openGated(t, t.TempDir(), Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20, noSpare: true, resumeAfter: time.Hour})
	diskErrors := func() float64 { return testutil.ToFloat64(q.m.refused.WithLabelValues("disk_error")) }
	a := admit(t, q, msg("d", 0))
	g.next(t, "the first batch").release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	q.creating = func(f *os.File) { f.Close() } // the new segment's sync fails
	big := msg("d", 1)
	big.Payload = make([]byte, 5<<10) // does not fit the first segment
	if err := result(t, admit(t, q, big)); err == nil {
		t.Fatal("batch reported durable though its segment could not be made")
	}
	if n := diskErrors(); n != 1 {
		t.Fatalf("disk_error refusals after a failed rotation = %v, want 1", n)
	}
	if _, err := q.AcceptAsync(context.Background(), msg("d", 2)); err == nil {
		t.Fatal("admitted while stopped after a failed rotation")
	}
	q.creating = nil
	signal(q.resumeDue) // (after the write above: the writer reads creating)
	waitFor(t, "resume", func() bool { return q.Stats().Err == nil })
	b := admit(t, q, msg("d", 2))
	hb := g.next(t, "the failing batch")
	c := admit(t, q, msg("d", 3))
	hb.release <- errors.New("EIO from the test")
	for _, ch := range []<-chan error{b, c} {
		if err := result(t, ch); err == nil {
			t.Fatal("batch reported durable after a failed fsync")
		}
	}
	if _, err := q.AcceptAsync(context.Background(), msg("d", 4)); err == nil {
		t.Fatal("admitted while stopped after a failed fsync")
	}
	if n := diskErrors(); n != 5 {
		t.Fatalf("disk_error refusals = %v, want 5 (the rotation's, the admission after it, the failed fsync's, the batch after it, the admission)", n)
	}
}

// TestFailedFsyncCountsOnlyTheRefused: of a batch whose fsync fails, only
// the messages whose Accept reports the failure (QoS 1, by channel or
// callback) are refused; its QoS 0 message, whose Accept returned at
// admission and which stays held, is accepted. Each message is counted
// once: accepted plus refused is what was offered. Before, the whole batch
// was counted accepted when written and refused when its fsync failed.
func TestFailedFsyncCountsOnlyTheRefused(t *testing.T) {
	q, _, g := openGated(t, t.TempDir(), Options{resumeAfter: time.Hour})
	accepted := func() float64 { return testutil.ToFloat64(q.m.accepted) }
	diskErrors := func() float64 { return testutil.ToFloat64(q.m.refused.WithLabelValues("disk_error")) }
	ctx := context.Background()
	a := admit(t, q, msg("d", 0))
	ha := g.next(t, "the first batch") // the next three gather behind it
	b := admit(t, q, msg("d", 1))
	zero := msg("d", 2)
	zero.QoS = 0
	if ch, err := q.AcceptAsync(ctx, zero); err != nil || ch != nil {
		t.Fatalf("AcceptAsync QoS 0: channel %v, err %v", ch, err)
	}
	told := make(chan error, 1)
	if pending, err := q.AcceptNotify(ctx, msg("d", 3), func(err error) { told <- err }); !pending || err != nil {
		t.Fatalf("AcceptNotify: pending %v, err %v", pending, err)
	}
	ha.release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	hb := g.next(t, "the failing batch")
	hb.release <- errors.New("EIO from the test")
	for _, ch := range []<-chan error{b, told} {
		if err := result(t, ch); err == nil {
			t.Fatal("reported durable after a failed fsync")
		}
	}
	if got := len(drain(t, q)); got != 4 {
		t.Fatalf("held %d, want all 4 (a failed fsync's batch stays held)", got)
	}
	if acc, ref := accepted(), diskErrors(); acc != 2 || ref != 2 {
		t.Fatalf("accepted %v, disk_error refusals %v; want 2 and 2 (the first and the QoS 0; the two told of the failure)", acc, ref)
	}
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 5 s: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestMarksKeptWhileStopped: delivered-marks whose timer fires while a
// failed fsync stops the queue are not written (nothing is, after a failed
// fsync) but kept, and written to resume's segment once it accepts again.
// Before, that flush dropped them: the delivered messages came back after
// a restart.
func TestMarksKeptWhileStopped(t *testing.T) {
	dir := t.TempDir()
	q, _, g := openGated(t, dir, Options{AckFlushInterval: 10 * time.Millisecond, resumeAfter: time.Hour})
	a := admit(t, q, msg("d", 0))
	g.next(t, "the first batch").release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	k := admit(t, q, msg("k", 0)) // not delivered: held after the reopen
	g.next(t, "the kept message's batch").release <- nil
	if err := result(t, k); err != nil {
		t.Fatal(err)
	}
	failNextFsync(t, q, g, msg("d", 1))
	es := drain(t, q)
	if len(es) != 3 || es[1].Device != "k" {
		t.Fatalf("held before the acks: %+v; want d's, k's, then the failed batch's", es)
	}
	if err := q.Ack(es[0].Seq, es[2].Seq); err != nil {
		t.Fatal(err)
	}
	// The marks' timer fires and its flush runs on the writer, which
	// runs resume only after it.
	waitFor(t, "the marks' timer fired", func() bool {
		q.mu.Lock()
		defer q.mu.Unlock()
		return !q.ackArmed
	})
	signal(q.resumeDue)
	waitFor(t, "resume", func() bool { return q.Stats().Err == nil })
	waitFor(t, "the marks written to resume's segment", func() bool { return activeSize(q) > int64(segHeader) })
	q.Close()
	q2, _ := open(t, dir, Options{})
	if got := drain(t, q2); len(got) != 1 || got[0].Seq != es[1].Seq || got[0].Device != "k" {
		t.Fatalf("after reopen: %+v; want only k's message (seq %d): the delivered ones not back, the undelivered one kept", got, es[1].Seq)
	}
}

// TestMarksRearmedAfterFailedWrite: when the marks' timer fired and the
// writer took them with a batch whose write failed (here its new segment
// could not be made), they are put back, and written once the queue
// resumes (the failure stops it), without waiting for another batch or
// Ack. Before, they waited.
func TestMarksRearmedAfterFailedWrite(t *testing.T) {
	q, _, g := openGated(t, t.TempDir(), Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20, noSpare: true, AckFlushInterval: 10 * time.Millisecond, resumeAfter: time.Hour})
	a := admit(t, q, msg("d", 0))
	g.next(t, "the first batch").release <- nil
	if err := result(t, a); err != nil {
		t.Fatal(err)
	}
	es := drain(t, q)
	c := admit(t, q, msg("d", 1))
	hc := g.next(t, "a batch, held")            // the writer waits in its fsync
	q.creating = func(f *os.File) { f.Close() } // the new segment's sync fails
	big := msg("d", 2)
	big.Payload = make([]byte, 5<<10) // does not fit the first segment
	bigc := admit(t, q, big)
	<-q.wake // so that the writer next wakes for the marks' timer, with the batch
	if err := q.Ack(es[0].Seq); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the marks' timer fired", func() bool { return len(q.ackDue) == 1 })
	hc.release <- nil
	if err := result(t, c); err != nil {
		t.Fatal(err)
	}
	if err := result(t, bigc); err == nil {
		t.Fatal("batch reported durable though its segment could not be made")
	}
	q.creating = nil
	signal(q.resumeDue) // (after the write above: the writer reads creating)
	waitFor(t, "resume", func() bool { return q.Stats().Err == nil })
	waitFor(t, "the marks written after the failed write", func() bool { return activeSize(q) > int64(segHeader) })
}

// TestMarksRetryBacksOff: while the disk fails every write, pending
// delivered-marks are tried again after a pause that doubles from
// AckFlushInterval (up to ackRetryMax), not every AckFlushInterval for
// good, and the log says the marks failed, not that a batch was refused
// (there is none). One write that succeeds resets the pause. Before, a
// failing card logged "refusing this batch" at ERROR every second forever.
// Only lower bounds on the pauses are checked: a timer never fires early.
func TestMarksRetryBacksOff(t *testing.T) {
	const every = 10 * time.Millisecond
	var failing atomic.Bool
	var mu sync.Mutex
	var tries []time.Time
	o := Options{AckFlushInterval: every}
	o.writeAt = func(f *os.File, b []byte, off int64) (int, error) {
		if !failing.Load() {
			return f.WriteAt(b, off)
		}
		mu.Lock()
		tries = append(tries, time.Now())
		mu.Unlock()
		return 0, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.EIO}
	}
	var logs logbuf.Buffer
	q, err := Open(t.TempDir(), o, slog.New(slog.NewTextHandler(&logs, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	if err := q.Accept(context.Background(), msg("d", 0)); err != nil {
		t.Fatal(err)
	}
	es := drain(t, q)
	failing.Store(true)
	if err := q.Ack(es[0].Seq); err != nil {
		t.Fatal(err)
	}
	const n = 5
	waitFor(t, fmt.Sprintf("%d tries to write the marks", n), func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(tries) >= n
	})
	mu.Lock()
	got := slices.Clone(tries[:n])
	mu.Unlock()
	for k := 1; k < n; k++ {
		if gap, want := got[k].Sub(got[k-1]), every<<(k-1); gap < want {
			t.Errorf("try %d came %v after try %d; want at least %v (the pause doubles after each failure)", k+1, gap, k, want)
		}
	}
	if l := logs.String(); strings.Contains(l, "refusing this batch") || !strings.Contains(l, "writing delivered-marks failed") {
		t.Errorf("log after failed marks-only writes:\n%s\nwant the marks' failure, no refused batch", l)
	}
	size := activeSize(q)
	failing.Store(false)
	waitFor(t, "the marks written once the disk works", func() bool { return activeSize(q) > size })
	q.mu.Lock()
	retry := q.ackRetry
	q.mu.Unlock()
	if retry != 0 {
		t.Errorf("pause after a write succeeded = %v, want reset (0)", retry)
	}
}

// failNextFsync admits m and fails the fsync of its batch (q's syncs gated
// by g): the queue must not report it durable.
func failNextFsync(t *testing.T, q *Queue, g *gatedSyncs, m bridges.Message) {
	t.Helper()
	ch := admit(t, q, m)
	g.next(t, "the failing batch").release <- errors.New("EIO from the test")
	if err := result(t, ch); err == nil {
		t.Fatal("batch reported durable after its fsync failed")
	}
}

// TestFailedWriteStopsTheQueue: a batch whose write fails (here ENOSPC)
// stops the queue as a failed fsync does: the batch admitted while it was
// being written, from the same device, is refused too, and so is every
// admission until resume has started a new segment. Before, the next batch
// was written at the same offset and acknowledged: the device's later
// message was stored and its earlier ones, refused, came after it when it
// sent them again.
func TestFailedWriteStopsTheQueue(t *testing.T) {
	dir := t.TempDir()
	entered, release := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	first.Store(true)
	o := Options{resumeAfter: time.Hour}
	o.writeAt = func(f *os.File, b []byte, off int64) (int, error) {
		if first.CompareAndSwap(true, false) {
			close(entered)
			<-release
			return 0, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
		}
		return f.WriteAt(b, off)
	}
	q, reg := open(t, dir, o)
	ctx := context.Background()
	a := admit(t, q, msg("d", 1))
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first batch was not written within 10 s")
	}
	b := admit(t, q, msg("d", 2)) // while the first is being written
	close(release)
	if err := result(t, a); !errors.Is(err, bridges.ErrQueueFull) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("first batch on a full disk: %v; want ErrQueueFull wrapping ENOSPC", err)
	}
	if err := result(t, b); err == nil {
		t.Fatal("the message admitted while the failing write ran was acknowledged: stored ahead of the refused one the device sends again")
	} else if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("the batch after the failed write: %v; want the failure (ENOSPC)", err)
	}
	if _, err := q.AcceptAsync(ctx, msg("d", 3)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("admission after a failed write: %v; want a refusal (ErrQueueFull: the disk is full)", err)
	}
	if v := metricValue(t, reg, "bastion_queue_stopped"); v != 1 || q.Stats().Err == nil {
		t.Fatalf("after a failed write: bastion_queue_stopped %v, Stats().Err %v; want 1 and the write's error", v, q.Stats().Err)
	}
	if n := testutil.ToFloat64(q.m.refused.WithLabelValues("disk_full")); n != 3 {
		t.Errorf("disk_full refusals = %v, want 3 (the failed batch, the one after it, the admission)", n)
	}
	q.mu.Lock()
	failedSeg := q.segs[len(q.segs)-1]
	q.mu.Unlock()
	signal(q.resumeDue)
	waitFor(t, "resume", func() bool { return q.Stats().Err == nil })
	// The device sends its refused messages again, in order.
	for i := 1; i <= 3; i++ {
		if err := q.Accept(ctx, msg("d", i)); err != nil {
			t.Fatalf("Accept %d after resuming: %v", i, err)
		}
	}
	q.mu.Lock()
	active := q.segs[len(q.segs)-1]
	q.mu.Unlock()
	if active == failedSeg {
		t.Fatalf("commits after resuming went to %s, the segment of the failed write", active.path)
	}
	q.Close()
	q2, _ := open(t, dir, Options{})
	var got []string
	for _, e := range drain(t, q2) {
		got = append(got, string(e.Payload))
	}
	if want := []string{`{"i":1}`, `{"i":2}`, `{"i":3}`}; !slices.Equal(got, want) {
		t.Fatalf("after reopen: %v, want %v", got, want)
	}
}

// TestRefusedWriteNotBackAfterRestart: a write that put the batch's bytes
// in the page cache and then failed (a short write, then EIO) is refused;
// its records must not come back after a restart, or a message its device
// was told to send again is delivered, and its resend too, under another
// seq: a duplicate the cloud cannot drop. Before, recover took them (whole
// records, checksum valid, seq above the last).
// The marks are written to resume's segment, or at Close if the queue is
// still stopped then.
func TestRefusedWriteNotBackAfterRestart(t *testing.T) {
	for _, resumed := range []bool{false, true} {
		t.Run(fmt.Sprintf("resumed=%v", resumed), func(t *testing.T) {
			dir := t.TempDir()
			var writes atomic.Int32
			o := Options{resumeAfter: time.Hour}
			o.writeAt = func(f *os.File, b []byte, off int64) (int, error) {
				if writes.Add(1) == 2 { // the second batch's
					if n, err := f.WriteAt(b, off); err != nil {
						return n, err
					}
					return 0, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.EIO}
				}
				return f.WriteAt(b, off)
			}
			q, _ := open(t, dir, o)
			if err := q.Accept(context.Background(), msg("d", 0)); err != nil {
				t.Fatal(err)
			}
			if err := q.Accept(context.Background(), msg("d", 1)); err == nil {
				t.Fatal("Accept reported durable though its write failed")
			}
			if resumed {
				signal(q.resumeDue)
				waitFor(t, "resume", func() bool { return q.Stats().Err == nil })
			}
			// Closed while stopped, it reports the failure, though it
			// wrote the marks.
			if err := q.Close(); (err != nil) == resumed {
				t.Errorf("Close: %v; want the write's failure only if still stopped", err)
			}
			q2, _ := open(t, dir, Options{})
			var got []string
			for _, e := range drain(t, q2) {
				got = append(got, string(e.Payload))
			}
			if want := []string{`{"i":0}`}; !slices.Equal(got, want) {
				t.Fatalf("after reopen: %v; want %v (the acknowledged one kept, the refused one not back)", got, want)
			}
		})
	}
}

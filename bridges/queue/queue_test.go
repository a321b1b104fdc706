package queue

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv("BASTION_QUEUE_CHILD"); dir != "" {
		os.Exit(childAccept(dir))
	}
	goleak.VerifyTestMain(m)
}

var discard = slog.New(slog.DiscardHandler)

func open(t *testing.T, dir string, o Options) (*Queue, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	q, err := Open(dir, o, discard, reg)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	// Cleanups run last first: the check after Close, once the writer has
	// stopped (a batch it holds is in neither q.batch nor q.ents).
	t.Cleanup(func() { checkShares(t, q) })
	t.Cleanup(func() { q.Close() })
	return q, reg
}

// epoch is recent so that test messages are young for the age bound.
var epoch = time.Now().Truncate(time.Second).UTC()

func msg(dev string, i int) bridges.Message {
	return bridges.Message{
		Device: dev, Topic: "devices/" + dev + "/t/temp", QoS: 1,
		Payload:  []byte(fmt.Sprintf(`{"i":%d}`, i)),
		Received: epoch.Add(time.Duration(i)),
	}
}

func drain(t *testing.T, q *Queue) []Entry {
	t.Helper()
	var all []Entry
	var after uint64
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		es, err := q.Next(ctx, after, 1000)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			return all
		}
		if err != nil {
			t.Fatalf("Next(after %d): %v", after, err)
		}
		all = append(all, es...)
		after = es[len(es)-1].Seq
	}
}

func normalize(es []Entry) []bridges.Message {
	var out []bridges.Message
	for _, e := range es {
		m := e.Message
		m.Received = m.Received.UTC()
		out = append(out, m)
	}
	return out
}

func TestAcceptNextAckReopen(t *testing.T) {
	dir := t.TempDir()
	q, reg := open(t, dir, Options{SegmentBytes: 1 << 10, MaxBytes: 1 << 20})
	ctx := context.Background()
	var want []bridges.Message
	for i := range 100 {
		m := msg([]string{"a", "b", "c"}[i%3], i)
		if err := q.Accept(ctx, m); err != nil {
			t.Fatalf("Accept %d: %v", i, err)
		}
		want = append(want, m)
	}
	got := drain(t, q)
	if d := cmp.Diff(want, normalize(got)); d != "" {
		t.Fatalf("Next after Accept (-want +got):\n%s", d)
	}
	for i := 1; i < len(got); i++ {
		if got[i].Seq <= got[i-1].Seq {
			t.Fatalf("seq not increasing at %d: %d then %d", i, got[i-1].Seq, got[i].Seq)
		}
	}
	// Ack the first 60 (out of order) and 70.
	var acks []uint64
	for i := 59; i >= 0; i-- {
		acks = append(acks, got[i].Seq)
	}
	acks = append(acks, got[70].Seq)
	if err := q.Ack(acks...); err != nil {
		t.Fatalf("Ack: %v", err)
	}
	if n := metricValue(t, reg, "bastion_queue_depth"); n != 39 {
		t.Fatalf("depth metric after acks = %v, want 39", n)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wantLeft := append(append([]bridges.Message{}, want[60:70]...), want[71:]...)
	q2, _ := open(t, dir, Options{SegmentBytes: 1 << 10, MaxBytes: 1 << 20})
	got2 := drain(t, q2)
	if d := cmp.Diff(wantLeft, normalize(got2)); d != "" {
		t.Fatalf("after reopen (-want +got):\n%s", d)
	}
	// New messages continue the sequence.
	if err := q2.Accept(ctx, msg("a", 1000)); err != nil {
		t.Fatalf("Accept after reopen: %v", err)
	}
	got3 := drain(t, q2)
	if last := got3[len(got3)-1]; last.Seq <= got[len(got)-1].Seq {
		t.Fatalf("seq after reopen %d not above %d", last.Seq, got[len(got)-1].Seq)
	}
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

// TestGroupCommit: 50 concurrent publishers must share fsyncs.
func TestGroupCommit(t *testing.T) {
	q, reg := open(t, t.TempDir(), Options{})
	const pubs, each = 50, 100
	var wg sync.WaitGroup
	errs := make(chan error, pubs)
	start := time.Now()
	for p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				if err := q.Accept(context.Background(), msg(fmt.Sprintf("d%d", p), i)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("Accept: %v", err)
	}
	el := time.Since(start)
	fsyncs := metricValue(t, reg, "bastion_queue_fsyncs_total")
	n := float64(pubs * each)
	t.Logf("%d durable accepts from %d publishers in %v (%.0f/s), %v fsyncs (%.1f messages per fsync)", pubs*each, pubs, el, n/el.Seconds(), fsyncs, n/fsyncs)
	if fsyncs > n/5 {
		t.Fatalf("fsyncs = %v for %v messages from %d concurrent publishers: group commit is not batching", fsyncs, n, pubs)
	}
	// Order per device is acceptance order.
	last := map[string]int{}
	for _, e := range drain(t, q) {
		var i int
		fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
		if prev, ok := last[e.Device]; ok && i != prev+1 {
			t.Fatalf("device %s: message %d after %d", e.Device, i, prev)
		}
		last[e.Device] = i
	}
	if len(last) != pubs {
		t.Fatalf("devices seen = %d, want %d", len(last), pubs)
	}
}

func TestTornTailIsCut(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{})
	for i := range 10 {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 1 {
		t.Fatalf("segments = %v, want 1", segs)
	}
	full, _ := os.ReadFile(segs[0])
	full = full[:recordsEnd(full)] // without the preallocated zeros
	one := len(appendMsg(nil, 1, ptr(msg("a", 0))))
	cases := map[string][]byte{
		"half a record":       full[:len(full)-one/2],
		"header only":         append(append([]byte{}, full...), 0x20, 0, 0, 0),
		"garbage after":       append(append([]byte{}, full...), []byte("\xff\xff\xff\x7fgarbage")...),
		"flipped bit in last": flip(full, len(full)-3),
	}
	want := map[string]int{"half a record": 9, "header only": 10, "garbage after": 10, "flipped bit in last": 9}
	// The same in a preallocated segment: the torn bytes, then zeros.
	for name, data := range maps.Clone(cases) {
		cases[name+", zero tail"] = append(append([]byte{}, data...), make([]byte, 8<<10)...)
		want[name+", zero tail"] = want[name]
	}
	for name, data := range cases {
		t.Run(name, func(t *testing.T) {
			d := t.TempDir()
			if err := os.WriteFile(filepath.Join(d, filepath.Base(segs[0])), data, 0o600); err != nil {
				t.Fatal(err)
			}
			q, reg := open(t, d, Options{})
			if got := len(drain(t, q)); got != want[name] {
				t.Fatalf("messages after cut = %d, want %d", got, want[name])
			}
			if c := metricValue(t, reg, "bastion_queue_records_cut_total"); c != 1 {
				t.Fatalf("records_cut_total = %v, want 1", c)
			}
			// The log continues cleanly after the cut.
			if err := q.Accept(context.Background(), msg("a", 99)); err != nil {
				t.Fatal(err)
			}
			q.Close()
			q2, reg2 := open(t, d, Options{})
			if got := len(drain(t, q2)); got != want[name]+1 {
				t.Fatalf("after append and reopen = %d, want %d", got, want[name]+1)
			}
			if c := metricValue(t, reg2, "bastion_queue_records_cut_total"); c != 0 {
				t.Fatalf("second open cut again: %v", c)
			}
		})
	}
}

// TestCorruptionInLastSegmentIsSkipped: a bad record in the last segment
// that valid messages follow is not a torn tail (a torn write damages only
// the batch after the last fsync, and leaves nothing valid after it unless
// that batch landed out of order, when keeping it costs a duplicate at
// most): only its bytes are skipped, the messages after it are kept, in
// order, and the queue appends after the last of them. Before, the segment
// was cut there: one flipped bit in the first record lost the whole backlog
// (with 4 MiB segments the last one usually holds most of it).
func TestCorruptionInLastSegmentIsSkipped(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{})
	for i := range 10 {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 1 {
		t.Fatalf("segments = %v, want 1", segs)
	}
	full, _ := os.ReadFile(segs[0]) // with the preallocated zeros
	var offs []int
	hdr, key := segStart(full)
	for off := hdr; off < recordsEnd(full); {
		_, n, _ := decodeRecordIn(full[off:], key, nil)
		offs = append(offs, off)
		off += n
	}
	if len(offs) != 10 {
		t.Fatalf("records = %d, want 10", len(offs))
	}
	except := func(lost ...int) []int {
		var w []int
		for i := range 10 {
			if !slices.Contains(lost, i) {
				w = append(w, i)
			}
		}
		return w
	}
	cases := []struct {
		name string
		data []byte
		want []int
	}{
		{"bit flipped in the first record", flip(full, offs[0]+recHeader+3), except(0)},
		{"bit flipped in a middle record", flip(full, offs[5]+recHeader+3), except(5)},
		{"length of the first record destroyed", func() []byte {
			c := append([]byte{}, full...)
			binary.LittleEndian.PutUint32(c[offs[0]:], 0xffffff00)
			return c
		}(), except(0)},
		// The last batch's later sector on disk, its earlier one not (still
		// the preallocated zeros): kept, a duplicate at most.
		{"zeros before valid records", func() []byte {
			c := append([]byte{}, full...)
			clear(c[offs[3]:offs[6]])
			return c
		}(), except(3, 4, 5)},
	}
	payloads := func(es []Entry) []int {
		var got []int
		for _, e := range es {
			var i int
			fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
			got = append(got, i)
		}
		return got
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			if err := os.WriteFile(filepath.Join(d, filepath.Base(segs[0])), c.data, 0o600); err != nil {
				t.Fatal(err)
			}
			check := func(q *Queue, reg *prometheus.Registry, want []int) {
				t.Helper()
				if diff := cmp.Diff(want, payloads(drain(t, q))); diff != "" {
					t.Fatalf("messages after open (-want +got):\n%s", diff)
				}
				// The same damaged bytes each open (they stay on disk),
				// never a second stretch, never a cut.
				if v := metricValue(t, reg, "bastion_queue_corrupt_skipped_total"); v != 1 {
					t.Fatalf("corrupt_skipped_total = %v, want 1", v)
				}
				if v := metricValue(t, reg, "bastion_queue_records_cut_total"); v != 0 {
					t.Fatalf("records_cut_total = %v, want 0", v)
				}
			}
			q, reg := open(t, d, Options{})
			check(q, reg, c.want)
			// New commits go after the last kept record, not over it and
			// not after the zeros.
			if err := q.Accept(context.Background(), msg("a", 99)); err != nil {
				t.Fatal(err)
			}
			q.mu.Lock()
			size, seq := q.segs[0].size, q.ents[len(q.ents)-1].seq
			q.mu.Unlock()
			if want := int64(recordsEnd(full) + len(appendMsg(nil, seq, ptr(msg("a", 99))))); size != want {
				t.Fatalf("segment size after the append = %d, want %d (the end of the last record, then the new one)", size, want)
			}
			q.Close()
			q2, reg2 := open(t, d, Options{})
			check(q2, reg2, append(slices.Clone(c.want), 99))
			q2.Close()
		})
	}
}

// TestCorruptionInCompletedSegmentIsSkipped: a bad record in a segment
// before the last is the disk's corruption of acknowledged messages (the
// segment was synced before the next one was started), so only the damaged
// bytes are skipped and every message after them is kept, in order. In the
// last segment the same when valid messages follow; a bad record that
// nothing valid follows is a torn tail and is cut (TestTornTailIsCut).
func TestCorruptionInCompletedSegmentIsSkipped(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentBytes: 1 << 10, MaxBytes: 1 << 20}
	q, _ := open(t, dir, opts)
	const total = 60
	for i := range total {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	sort.Strings(segs)
	if len(segs) < 3 {
		t.Fatalf("segments = %d, want at least 3 (SegmentBytes too large for the test)", len(segs))
	}
	files := map[string][]byte{}
	for _, s := range segs {
		files[s], _ = os.ReadFile(s)
	}
	// offsets of the records of a segment, and the message index of each
	starts := func(data []byte) (offs, idx []int) {
		off, key := segStart(data)
		for off < len(data) {
			rec, n, err := decodeRecordIn(data[off:], key, nil)
			if err != nil {
				break
			}
			var i int
			fmt.Sscanf(string(rec.msg.Payload), `{"i":%d}`, &i)
			offs, idx = append(offs, off), append(idx, i)
			off += n
		}
		return offs, idx
	}
	first, lastSeg := segs[0], segs[len(segs)-1]
	offs, idx := starts(files[first])
	lOffs, lIdx := starts(files[lastSeg])
	if len(offs) < 5 || len(lOffs) < 3 {
		t.Fatalf("records in first/last segment = %d/%d, want at least 5/3", len(offs), len(lOffs))
	}
	except := func(lost ...int) []int {
		var w []int
		for i := range total {
			if !slices.Contains(lost, i) {
				w = append(w, i)
			}
		}
		return w
	}
	upTo := func(n int) []int { return except(lIdx[slices.Index(lIdx, n):]...) }
	garble := func(b []byte, from, to int) []byte {
		c := append([]byte{}, b...)
		for i := from; i < to; i++ {
			c[i] = 0xaa
		}
		return c
	}
	cases := []struct {
		name          string
		seg           string
		data          []byte
		want          []int
		skipped, cuts float64
	}{
		{"bit flipped in a body", first, flip(files[first], offs[2]+recHeader+3), except(idx[2]), 1, 0},
		{"length destroyed", first, func() []byte {
			c := append([]byte{}, files[first]...)
			binary.LittleEndian.PutUint32(c[offs[2]:], 0xffffff00)
			return c
		}(), except(idx[2]), 1, 0},
		{"two records garbled", first, garble(files[first], offs[2]+2, offs[3]+5), except(idx[2], idx[3]), 1, 0},
		{"two stretches", first, garble(garble(files[first], offs[1]+1, offs[1]+4), offs[3]+1, offs[3]+4), except(idx[1], idx[3]), 2, 0},
		// Valid records follow: corruption of acknowledged messages (or
		// an unacknowledged batch torn out of order: a duplicate at most),
		// skipped as in a completed segment (TestCorruptionInLastSegmentIsSkipped).
		{"last segment: skipped too", lastSeg, flip(files[lastSeg], lOffs[1]+recHeader+3), except(lIdx[1]), 1, 0},
		{"last segment: its last record, cut", lastSeg, flip(files[lastSeg], lOffs[len(lOffs)-1]+recHeader+3), upTo(lIdx[len(lIdx)-1]), 0, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := t.TempDir()
			for s, data := range files {
				if s == c.seg {
					data = c.data
				}
				if err := os.WriteFile(filepath.Join(d, filepath.Base(s)), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			check := func(q *Queue, reg *prometheus.Registry, want []int) {
				t.Helper()
				var got []int
				for _, e := range drain(t, q) {
					var i int
					fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
					got = append(got, i)
				}
				if d := cmp.Diff(want, got); d != "" {
					t.Fatalf("messages after open (-want +got):\n%s", d)
				}
				if v := metricValue(t, reg, "bastion_queue_corrupt_skipped_total"); v != c.skipped {
					t.Fatalf("corrupt_skipped_total = %v, want %v", v, c.skipped)
				}
			}
			q, reg := open(t, d, opts)
			check(q, reg, c.want)
			if v := metricValue(t, reg, "bastion_queue_records_cut_total"); v != c.cuts {
				t.Fatalf("records_cut_total = %v, want %v", v, c.cuts)
			}
			// The queue goes on: a new message is kept after the damage,
			// and the next open skips the same bytes again.
			if err := q.Accept(context.Background(), msg("a", 1000)); err != nil {
				t.Fatal(err)
			}
			q.Close()
			q2, reg2 := open(t, d, opts)
			check(q2, reg2, append(slices.Clone(c.want), 1000))
		})
	}
}

// TestUnreadableBlocksAreSkipped: blocks of a segment the disk cannot read
// (EIO) lose only the messages in them; the gateway opens its queue and
// keeps the rest, in order, in any segment. Any other read error still
// refuses to open.
func TestUnreadableBlocksAreSkipped(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20, readRetries: []time.Duration{0, 0}}
	q, _ := open(t, dir, opts)
	total, extra := 0, -1 // until a third segment holds 200 messages
	for ; extra != 0; total++ {
		if total == 10000 {
			t.Fatal("no third segment after 10,000 messages of 16 KiB segments")
		}
		if err := q.Accept(context.Background(), msg("a", total)); err != nil {
			t.Fatal(err)
		}
		if segs, _ := filepath.Glob(filepath.Join(dir, "*.seg")); len(segs) == 3 && extra < 0 {
			extra = 200
		}
		if extra > 0 {
			extra--
		}
	}
	q.Close()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	sort.Strings(segs)
	const from, to = 4 << 10, 8 << 10
	// the messages whose records touch [from, to) of a segment
	inBlock := func(path string) []int {
		data, _ := os.ReadFile(path)
		var lost []int
		off, key := segStart(data)
		for off < len(data) {
			rec, n, err := decodeRecordIn(data[off:], key, nil)
			if err != nil {
				break
			}
			if off < to && off+n > from {
				var i int
				fmt.Sscanf(string(rec.msg.Payload), `{"i":%d}`, &i)
				lost = append(lost, i)
			}
			off += n
		}
		return lost
	}
	// Each case opens its own copy: a recovery that cut a segment must
	// not change what the next case reads.
	copyQueue := func(t *testing.T) string {
		d := t.TempDir()
		for _, s := range segs {
			data, err := os.ReadFile(s)
			if err == nil {
				err = os.WriteFile(filepath.Join(d, filepath.Base(s)), data, 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	same := func(f *os.File, seg string) bool { return filepath.Base(f.Name()) == filepath.Base(seg) }
	for _, c := range []struct{ name, seg string }{{"completed segment", segs[0]}, {"last segment", segs[2]}} {
		t.Run(c.name, func(t *testing.T) {
			lost := inBlock(c.seg)
			if len(lost) == 0 {
				t.Fatalf("no record in %s touches [%d, %d): the segment is too short for the test", c.seg, from, to)
			}
			o := opts
			o.readAt = func(f *os.File, b []byte, off int64) (int, error) {
				if same(f, c.seg) && off < to && off+int64(len(b)) > from {
					return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.EIO}
				}
				return f.ReadAt(b, off)
			}
			q, reg := open(t, copyQueue(t), o)
			var got []int
			for _, e := range drain(t, q) {
				var i int
				fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
				got = append(got, i)
			}
			var want []int
			for i := range total {
				if !slices.Contains(lost, i) {
					want = append(want, i)
				}
			}
			if d := cmp.Diff(want, got); d != "" {
				t.Fatalf("messages after open with blocks unreadable (-want +got):\n%s", d)
			}
			if v := metricValue(t, reg, "bastion_queue_unreadable_bytes_total"); v != to-from {
				t.Fatalf("unreadable_bytes_total = %v, want %d", v, to-from)
			}
			q.Close()
		})
	}
	t.Run("a glitch that passes loses nothing", func(t *testing.T) {
		o := opts
		var fails atomic.Int32
		o.readAt = func(f *os.File, b []byte, off int64) (int, error) {
			// the chunk, the block and its first retry fail; the second
			// retry reads
			if same(f, segs[0]) && off < to && off+int64(len(b)) > from && fails.Add(1) <= 3 {
				return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.EIO}
			}
			return f.ReadAt(b, off)
		}
		q, reg := open(t, copyQueue(t), o)
		if n := len(drain(t, q)); n != total {
			t.Fatalf("messages = %d, want all %d", n, total)
		}
		if v := metricValue(t, reg, "bastion_queue_unreadable_bytes_total"); v != 0 {
			t.Fatalf("unreadable_bytes_total = %v, want 0", v)
		}
		q.Close()
	})
	t.Run("other read errors refuse to open", func(t *testing.T) {
		o := opts
		o.readAt = func(f *os.File, b []byte, off int64) (int, error) {
			return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.ENOMEM}
		}
		q, err := Open(copyQueue(t), o, discard, nil)
		if err == nil {
			q.Close()
			t.Fatal("Open succeeded with every read failing")
		}
		if !errors.Is(err, syscall.ENOMEM) {
			t.Fatalf("Open: %v, want the read error", err)
		}
	})
}

// TestUnreadableAtRuntimeIsDropped: a held message the disk cannot read
// when it is due upstream is tried again for unreadableGrace (a disk that
// comes back loses nothing; nothing after it is handed out, for order),
// then dropped, counted and marked delivered, and the messages after it
// come; before, the link stopped at it for good.
func TestUnreadableAtRuntimeIsDropped(t *testing.T) {
	t.Run("stays unreadable", func(t *testing.T) { testUnreadableAtRuntime(t, false) })
	t.Run("comes back", func(t *testing.T) { testUnreadableAtRuntime(t, true) })
}

func testUnreadableAtRuntime(t *testing.T, comesBack bool) {
	dir := t.TempDir()
	var badFrom, badTo atomic.Int64
	var clock atomic.Int64
	clock.Store(epoch.UnixNano())
	opts := Options{
		Now: func() time.Time { return time.Unix(0, clock.Load()) },
		readAt: func(f *os.File, b []byte, off int64) (int, error) {
			if off < badTo.Load() && off+int64(len(b)) > badFrom.Load() {
				return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.EIO}
			}
			return f.ReadAt(b, off)
		},
	}
	q, reg := open(t, dir, opts)
	const total = 40
	for i := range total {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.mu.Lock()
	badFrom.Store(q.ents[10].off + 1)
	badTo.Store(q.ents[12].off + 1) // messages 10, 11 and 12
	q.mu.Unlock()
	payloads := func(es []Entry) []int {
		var got []int
		for _, e := range es {
			var i int
			fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
			got = append(got, i)
		}
		return got
	}
	next := func(after uint64) ([]Entry, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return q.Next(ctx, after, 1000)
	}
	es, err := next(0)
	if err != nil || !slices.Equal(payloads(es), []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
		t.Fatalf("first Next = %v, %v; want 0-9 and no error", payloads(es), err)
	}
	after := es[len(es)-1].Seq
	for range 2 { // within the grace: the error, again and again
		if es, err := next(after); !errors.Is(err, syscall.EIO) {
			t.Fatalf("Next at the unreadable message = %v, %v; want EIO", payloads(es), err)
		}
	}
	if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != 0 {
		t.Fatalf("dropped within the grace: %v", v)
	}
	if comesBack {
		// The disk reads again before the grace is over: nothing lost.
		badFrom.Store(0)
		badTo.Store(0)
		if es, err := next(after); err != nil || len(es) != total-10 || payloads(es)[0] != 10 {
			t.Fatalf("after the disk came back: %v, %v; want 10-%d", payloads(es), err, total-1)
		}
		if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != 0 {
			t.Fatalf("dropped: %v", v)
		}
		return
	}
	clock.Add(int64(unreadableGrace))
	var want []int
	for i := 13; i < total; i++ {
		want = append(want, i)
	}
	es, err = next(after)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, payloads(es)); d != "" {
		t.Fatalf("after the grace (-want +got):\n%s", d)
	}
	if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != 3 {
		t.Fatalf("unreadable_dropped_total = %v, want 3", v)
	}
	if v := metricValue(t, reg, "bastion_queue_depth"); v != total-3 {
		t.Fatalf("depth = %v, want %d", v, total-3)
	}
	q.Close()
	// Marked delivered: a restart does not bring them back, even with the
	// disk reading them again.
	badFrom.Store(0)
	badTo.Store(0)
	q2, _ := open(t, dir, opts)
	if d := cmp.Diff(append([]int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, want...), payloads(drain(t, q2))); d != "" {
		t.Fatalf("after reopen (-want +got):\n%s", d)
	}
}

// TestUndecodableAtRuntimeIsDropped: a held message whose record no longer
// decodes when it is due upstream (its bytes changed on disk: here written
// through another descriptor, which Next's pread sees) is dropped at its
// first read, counted and marked delivered, and every message after it
// comes; before, Next returned the decoding error again and again and the
// link stopped at it for good, every device behind it. Nothing decodes it
// on a later try, so there is no grace (see loseLocked).
func TestUndecodableAtRuntimeIsDropped(t *testing.T) {
	type damage struct {
		name   string
		damage func(rec []byte)
	}
	for _, c := range []damage{
		{"checksum", func(rec []byte) { rec[recHeader+3] ^= 0x01 }},
		{"length", func(rec []byte) { binary.LittleEndian.PutUint32(rec, uint32(len(rec))) }},
		{"another seq", func(rec []byte) {
			m := msg("a", 10)
			copy(rec, appendMsg(nil, 7, &m)) // the same length: seq 7 is as short as 11
		}},
	} {
		t.Run(c.name+", after what is before it", func(t *testing.T) { testUndecodableAtRuntime(t, c.damage, false) })
		// The messages before it in the same read were decoded already:
		// they are handed out once, not twice.
		t.Run(c.name+", in one read with what is before it", func(t *testing.T) { testUndecodableAtRuntime(t, c.damage, true) })
	}
}

func testUndecodableAtRuntime(t *testing.T, damage func(rec []byte), oneRead bool) {
	dir := t.TempDir()
	q, reg := open(t, dir, Options{})
	const total = 40
	for i := range total {
		if err := q.Accept(context.Background(), msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.mu.Lock()
	bad := q.ents[10]
	q.mu.Unlock()
	rec := make([]byte, bad.n)
	f, err := os.OpenFile(bad.seg.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(rec, bad.off); err != nil {
		t.Fatal(err)
	}
	damage(rec)
	if _, err := f.WriteAt(rec, bad.off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	payloads := func(es []Entry) []int {
		var got []int
		for _, e := range es {
			var i int
			fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
			got = append(got, i)
		}
		return got
	}
	next := func(after uint64, max int) ([]Entry, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		return q.Next(ctx, after, max)
	}
	var before, rest []int
	for i := range total {
		switch {
		case i < 10:
			before = append(before, i)
		case i > 10:
			rest = append(rest, i)
		}
	}
	if oneRead {
		es, err := next(0, 1000)
		if d := cmp.Diff(append(slices.Clone(before), rest...), payloads(es)); err != nil || d != "" {
			t.Fatalf("Next(0) with the damaged message: %v (-want +got):\n%s", err, d)
		}
	} else {
		// What is before it comes as usual; it is not read yet.
		es, err := next(0, 10)
		if err != nil || !slices.Equal(payloads(es), before) {
			t.Fatalf("Next(0, 10) = %v, %v; want 0-9 and no error", payloads(es), err)
		}
		if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != 0 {
			t.Fatalf("dropped before it was read: %v", v)
		}
		// At its first read: dropped, and the rest come.
		es, err = next(es[len(es)-1].Seq, 1000)
		if err != nil {
			t.Fatalf("Next at the damaged message: %v", err)
		}
		if d := cmp.Diff(rest, payloads(es)); d != "" {
			t.Fatalf("Next at the damaged message (-want +got):\n%s", d)
		}
	}
	// Dropped for good: from the start, everything else, once.
	es, err := next(0, 1000)
	if d := cmp.Diff(append(slices.Clone(before), rest...), payloads(es)); err != nil || d != "" {
		t.Fatalf("Next(0) after the drop: %v (-want +got):\n%s", err, d)
	}
	if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != 1 {
		t.Fatalf("unreadable_dropped_total = %v, want 1", v)
	}
	if v := metricValue(t, reg, "bastion_queue_depth"); v != total-1 {
		t.Fatalf("depth = %v, want %d", v, total-1)
	}
	q.Close()
	// Marked delivered, and the damaged bytes are skipped at open
	// (the messages after them follow in the last segment).
	q2, _ := open(t, dir, Options{})
	if d := cmp.Diff(append(slices.Clone(before), rest...), payloads(drain(t, q2))); d != "" {
		t.Fatalf("after reopen (-want +got):\n%s", d)
	}
}

func ptr[T any](v T) *T { return &v }

// segStart is the offset of a segment's first record and its checksum key.
func segStart(data []byte) (int, uint32) {
	n, key, _ := parseSegHeader(data)
	return n, key
}

// recordsEnd is the offset after a segment's last decodable record.
func recordsEnd(data []byte) int {
	off, key := segStart(data)
	for off < len(data) {
		_, n, err := decodeRecordIn(data[off:], key, nil)
		if err != nil {
			break
		}
		off += n
	}
	return off
}

func flip(b []byte, i int) []byte {
	c := append([]byte{}, b...)
	c[i] ^= 0x01
	return c
}

func TestFullByBytes(t *testing.T) {
	q, reg := open(t, t.TempDir(), Options{MaxBytes: 8 << 10, SegmentBytes: 2 << 10})
	ctx := context.Background()
	accepted := 0
	var err error
	for i := 0; i < 10000; i++ {
		if err = q.Accept(ctx, msg("a", i)); err != nil {
			break
		}
		accepted++
	}
	if !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("Accept when full: %v, want ErrQueueFull", err)
	}
	if r := metricValue(t, reg, "bastion_queue_refusals_total"); r != 1 {
		t.Fatalf("refusals = %v, want 1", r)
	}
	// Every message held: copying any forward would free nothing.
	if c := metricValue(t, reg, "bastion_queue_compactions_total"); c != 0 {
		t.Fatalf("compactions = %v with every message held, want 0", c)
	}
	if st := q.Stats(); st.Bytes > 8<<10 || st.Depth != accepted {
		t.Fatalf("stats when full = %+v; want bytes <= %d and depth %d", st, 8<<10, accepted)
	}
	// Nothing held was dropped; delivering everything frees space.
	es := drain(t, q)
	if len(es) != accepted {
		t.Fatalf("held %d, accepted %d", len(es), accepted)
	}
	for _, e := range es {
		q.Ack(e.Seq)
	}
	if err := q.Accept(ctx, msg("a", 1)); err != nil {
		t.Fatalf("Accept after delivery freed space: %v", err)
	}
}

// TestFullByBytesBehindAHeldMessage: disk is freed from the front only,
// so held messages keep the segments after them on disk and counted
// against MaxBytes, however much of them is delivered. Compaction copies
// the head segment's held records forward only when that frees four times
// what it copies (see compactGain); here the head segment is all held and
// only one segment of delivered records is behind it, so it does not, and
// the queue refuses for bytes. The refusal says so, with the bytes that are
// delivered records and the message keeping them (it used to read as "N
// bytes held", a backlog that was not there). Once the held messages are
// delivered, the space is freed. (One stuck message among delivered ones
// is compacted instead: TestCompactionFreesDiskBehindAStuckMessage.)
func TestFullByBytesBehindAHeldMessage(t *testing.T) {
	q, reg := open(t, t.TempDir(), Options{MaxBytes: 8 << 10, SegmentBytes: 2 << 10})
	ctx := context.Background()
	// A head segment all held, one of delivered records, one held, then
	// delivered ones: each message is acknowledged or not by the segment
	// it went to.
	heldIn := func(seg int) bool { return seg == 0 || seg == 2 }
	var held []uint64
	var after uint64
	var err error
	for i := 0; ; i++ {
		if i > 10000 {
			t.Fatal("10000 messages accepted and the queue never refused one")
		}
		if err = q.Accept(ctx, msg("d", i)); err != nil {
			break
		}
		es, err := q.Held(after, 1)
		if err != nil || len(es) != 1 {
			t.Fatalf("Held: %v, %v", es, err)
		}
		after = es[0].Seq
		if heldIn(segCount(q) - 1) {
			held = append(held, after)
		} else if err := q.Ack(after); err != nil {
			t.Fatal(err)
		}
	}
	if !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("Accept when full: %v, want ErrQueueFull", err)
	}
	if d := q.Stats().Depth; d != len(held) {
		t.Fatalf("depth %d when refused, want %d (the held messages)", d, len(held))
	}
	for _, want := range []string{"bytes on disk", fmt.Sprintf("held messages: %d", len(held)), fmt.Sprintf("in segments of delivered records only, kept behind the oldest undelivered message, seq %d", held[0])} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q, want it to say %q", err, want)
		}
	}
	if got := metricValue(t, reg, "bastion_queue_compactions_total"); got != 0 {
		t.Errorf("bastion_queue_compactions_total = %v, want 0: copying a segment all held frees too little", got)
	}
	if err := q.Ack(held...); err != nil {
		t.Fatal(err)
	}
	if err := q.Accept(ctx, msg("a", 0)); err != nil {
		t.Fatalf("Accept once the held messages were delivered: %v", err)
	}
}

func TestFullByAge(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Unix(1700000000, 0).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	q, reg := open(t, t.TempDir(), Options{MaxAge: time.Hour, Now: clock})
	ctx := context.Background()
	m := msg("a", 0)
	m.Received = time.Time{} // stamped by the queue's clock
	if err := q.Accept(ctx, m); err != nil {
		t.Fatal(err)
	}
	now.Add(int64(30 * time.Minute))
	if got := metricValue(t, reg, "bastion_queue_oldest_age_seconds"); got != 1800 {
		t.Fatalf("oldest age = %v, want 1800", got)
	}
	if err := q.Accept(ctx, m); err != nil {
		t.Fatalf("Accept at 30m: %v", err)
	}
	now.Add(int64(31 * time.Minute))
	if err := q.Accept(ctx, m); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("Accept with a 61m old message held: %v, want ErrQueueFull", err)
	}
	es := drain(t, q)
	q.Ack(es[0].Seq)
	if err := q.Accept(ctx, m); err != nil {
		t.Fatalf("Accept after the old message was delivered: %v", err)
	}
}

func TestTooLarge(t *testing.T) {
	q, _ := open(t, t.TempDir(), Options{MaxMessageBytes: 100})
	m := msg("a", 0)
	m.Payload = make([]byte, 200)
	if err := q.Accept(context.Background(), m); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Accept 200 bytes with limit 100: %v, want ErrTooLarge", err)
	}
}

// TestNoWritesWhenIdle: once delivered-marks are flushed, an idle queue
// neither writes nor fsyncs.
func TestNoWritesWhenIdle(t *testing.T) {
	dir := t.TempDir()
	q, reg := open(t, dir, Options{AckFlushInterval: 10 * time.Millisecond})
	for i := range 5 {
		q.Accept(context.Background(), msg("a", i))
	}
	size := func() int64 { // bytes of records (segments are preallocated)
		segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
		var n int64
		for _, s := range segs {
			data, _ := os.ReadFile(s)
			n += int64(recordsEnd(data))
		}
		return n
	}
	// The size before the Acks: measured after them, a loaded machine may
	// already have written the marks (the interval is 10 ms), and the
	// wait below would never see a change.
	es := drain(t, q)
	before := size()
	for _, e := range es {
		q.Ack(e.Seq)
	}
	deadline := time.Now().Add(5 * time.Second)
	for size() == before { // the delivered-marks record lands after the interval
		if time.Now().After(deadline) {
			t.Fatalf("delivered marks never written")
		}
		time.Sleep(5 * time.Millisecond)
	}
	s1, f1 := size(), metricValue(t, reg, "bastion_queue_fsyncs_total")
	time.Sleep(200 * time.Millisecond) // 20 flush intervals of idleness
	if s2, f2 := size(), metricValue(t, reg, "bastion_queue_fsyncs_total"); s2 != s1 || f2 != f1 {
		t.Fatalf("idle queue wrote: size %d -> %d, fsyncs %v -> %v", s1, s2, f1, f2)
	}
}

// childAccept is the body of the re-executed test binary for the power-cut
// test: it accepts messages and prints each sequence number once Accept
// returned nil, until it is killed.
func childAccept(dir string) int {
	q, err := Open(dir, Options{}, discard, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for p := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := p; i < 1_000_000; i += 8 {
				m := msg("d"+strconv.Itoa(p), i)
				if err := q.Accept(context.Background(), m); err != nil {
					fmt.Fprintln(os.Stderr, err)
					return
				}
				mu.Lock()
				fmt.Fprintf(out, "%d\n", i)
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return 0
}

// TestSIGKILLKeepsEveryAcceptedMessage re-executes the test binary as a
// writer, SIGKILLs it mid-stream, and checks every message it saw accepted
// is in the reopened queue.
func TestSIGKILLKeepsEveryAcceptedMessage(t *testing.T) {
	for round := range 3 {
		dir := t.TempDir()
		cmd := child.DieWithTest(exec.Command(os.Args[0], "-test.run=^$"))
		cmd.Env = append(os.Environ(), "BASTION_QUEUE_CHILD="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		seen := map[int]bool{}
		sc := bufio.NewScanner(stdout)
		killAt := 2000 + round*1500
		for sc.Scan() {
			i, err := strconv.Atoi(sc.Text())
			if err != nil {
				t.Fatalf("child printed %q", sc.Text())
			}
			seen[i] = true
			if len(seen) == killAt {
				cmd.Process.Signal(syscall.SIGKILL)
				break
			}
		}
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		if len(seen) < killAt {
			t.Fatalf("child stopped after %d accepts before the kill", len(seen))
		}
		q, _ := open(t, dir, Options{})
		have := map[int]bool{}
		for _, e := range drain(t, q) {
			var i int
			fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
			have[i] = true
		}
		missing := 0
		for i := range seen {
			if !have[i] {
				missing++
			}
		}
		t.Logf("round %d: child acknowledged %d, queue holds %d after SIGKILL", round, len(seen), len(have))
		if missing > 0 {
			t.Fatalf("%d messages acknowledged by Accept are missing after SIGKILL", missing)
		}
		q.Close()
	}
}

// TestDiskFull fills a real (tiny tmpfs) filesystem: Accept must refuse
// with ErrQueueFull, keep everything it accepted, and work again once
// delivered segments free space (and the queue, stopped by the failed
// write, has resumed).
func TestDiskFull(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	// No timed resume within the test: making room must be enough.
	q, reg := open(t, dir, Options{MaxBytes: 64 << 20, SegmentBytes: 32 << 10, resumeAfter: time.Hour})
	ctx := context.Background()
	var err error
	accepted := 0
	for i := 0; i < 100000; i++ {
		m := msg("a", i)
		m.Payload = make([]byte, 1000)
		if err = q.Accept(ctx, m); err != nil {
			break
		}
		accepted++
	}
	if !errors.Is(err, bridges.ErrQueueFull) || !errors.Is(err, syscall.ENOSPC) || errors.Is(err, bridges.ErrDiskFailed) {
		t.Fatalf("Accept on a full disk: %v; want ErrQueueFull wrapping ENOSPC, not ErrDiskFailed", err)
	}
	if r := metricValue(t, reg, "bastion_queue_refusals_total"); r < 1 {
		t.Fatalf("refusals = %v", r)
	}
	es := drain(t, q)
	if len(es) != accepted {
		t.Fatalf("held %d after disk full, accepted %d", len(es), accepted)
	}
	for _, e := range es[:len(es)/2] {
		q.Ack(e.Seq)
	}
	// Removing delivered segments makes room: the queue tries again at
	// once, not after its pause.
	deadline := time.Now().Add(10 * time.Second)
	for q.Stats().Err != nil {
		if time.Now().After(deadline) {
			t.Fatalf("still stopped 10 s after delivery freed segments: %v", q.Stats().Err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := q.Accept(ctx, msg("a", -1)); err != nil {
		t.Fatalf("Accept after delivery freed segments: %v", err)
	}
	q.Close()
	q2, _ := open(t, dir, Options{MaxBytes: 64 << 20, SegmentBytes: 32 << 10})
	if got, want := len(drain(t, q2)), accepted-len(es)/2+1; got != want {
		t.Fatalf("after reopen %d held, want %d", got, want)
	}
}

// gateSync is an Options.Sync that signals entered and waits for gate
// before each fsync, and fails it while failNext is set.
func gateSync() (gate, entered chan struct{}, failNext *atomic.Bool, syncFn func(*os.File) error) {
	gate, entered, failNext = make(chan struct{}), make(chan struct{}, 64), new(atomic.Bool)
	return gate, entered, failNext, func(f *os.File) error {
		entered <- struct{}{}
		<-gate
		if failNext.Load() {
			return errors.New("EIO from the test")
		}
		return f.Sync()
	}
}

// TestAcceptAsync: admission decides at once, the channel reports the
// fsync. With the fsync held, 20 messages from one caller are admitted
// without waiting and none is reported durable; released, all are, in
// order, with fewer fsyncs than messages. A failed fsync is reported on the
// channel, and the queue refuses from then on.
func TestAcceptAsync(t *testing.T) {
	gate, entered, failNext, syncFn := gateSync()
	q, reg := open(t, t.TempDir(), Options{Sync: syncFn})
	ctx := context.Background()
	if ch, err := q.AcceptAsync(ctx, bridges.Message{Device: "d", Topic: "devices/d/t/x", QoS: 0}); ch != nil || err != nil {
		t.Fatalf("QoS 0: got channel %v, err %v; want nil, nil", ch, err)
	}
	fs0 := metricValue(t, reg, "bastion_queue_fsyncs_total")
	var chans []<-chan error
	for i := range 20 {
		ch, err := q.AcceptAsync(ctx, msg("d", i))
		if err != nil || ch == nil {
			t.Fatalf("AcceptAsync %d: channel %v, err %v", i, ch, err)
		}
		chans = append(chans, ch)
	}
	<-entered
	for i, ch := range chans {
		select {
		case err := <-ch:
			t.Fatalf("message %d reported (%v) while its fsync is held", i, err)
		default:
		}
	}
	if _, err := q.AcceptAsync(ctx, bridges.Message{Device: "d", Topic: "devices/d/t/x", QoS: 1, Payload: make([]byte, 300<<10)}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("too large: got %v, want ErrTooLarge at once", err)
	}
	close(gate)
	for i, ch := range chans {
		if err := <-ch; err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	if fs := metricValue(t, reg, "bastion_queue_fsyncs_total") - fs0; fs >= 20 || fs < 1 {
		t.Errorf("%v fsyncs for 20 messages admitted during one held fsync; want group commit", fs)
	}
	got := normalize(drain(t, q))
	var want []bridges.Message
	want = append(want, bridges.Message{Device: "d", Topic: "devices/d/t/x"})
	for i := range 20 {
		want = append(want, msg("d", i))
	}
	if diff := cmp.Diff(len(want), len(got)); diff != "" {
		t.Fatalf("held messages (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(want[1:], got[1:]); diff != "" {
		t.Errorf("order (-want +got):\n%s", diff)
	}

	failNext.Store(true)
	ch, err := q.AcceptAsync(ctx, msg("d", 99))
	if err != nil {
		t.Fatal(err)
	}
	if err := <-ch; err == nil {
		t.Fatal("failed fsync reported as durable")
	}
	if _, err := q.AcceptAsync(ctx, msg("d", 100)); err == nil {
		t.Fatal("queue admitted a message after a failed fsync")
	}
}

// TestNextSkipsAckedAndBounds: Next reads neighbouring records together;
// acked records and the delivered-marks written between batches inside
// that span are skipped, max is honoured, and a read spans segments
// correctly.
func TestNextSkipsAckedAndBounds(t *testing.T) {
	q, _ := open(t, t.TempDir(), Options{SegmentBytes: 2 << 10, MaxBytes: 1 << 20})
	ctx := context.Background()
	var held []bridges.Message
	accept := func(from, to int) {
		for i := from; i < to; i++ {
			m := msg("a", i)
			if err := q.Accept(ctx, m); err != nil {
				t.Fatalf("Accept %d: %v", i, err)
			}
			held = append(held, m)
		}
	}
	accept(0, 30)
	// Ack every third (seqs 3, 6, ...): their marks go out with the next batch.
	var keep []bridges.Message
	for i, m := range held {
		if (i+1)%3 == 0 {
			if err := q.Ack(uint64(i + 1)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		keep = append(keep, m)
	}
	held = nil
	accept(30, 60)
	keep = append(keep, held...)
	if d := cmp.Diff(keep, normalize(drain(t, q))); d != "" {
		t.Fatalf("Next after acks (-want +got):\n%s", d)
	}
	es, err := q.Next(ctx, 0, 5)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(keep[:5], normalize(es)); d != "" {
		t.Errorf("Next(max 5) (-want +got):\n%s", d)
	}
	if es[4].Seq != 7 {
		t.Errorf("fifth held entry has seq %d, want 7", es[4].Seq)
	}
}

// TestAllocsPerMessage: the queue's share of the allocations of one message
// through it (admission, the writer's batch, Next, Ack), in batches of 64
// as the MQTT pipeline and the link drive it, with AcceptAsync and with
// AcceptNotify (what the MQTT pipeline uses), read with NextInto as the
// link's sender does. What is left: the durability channel (none with
// AcceptNotify: 2.03 and 0.03 per message measured). (Before the writer
// reused its batch buffers and Next stopped copying each field twice and
// the payload: 12.7 per message; before Next's device and topic strings
// came from the queue's interner: 4.2 and 3.2, of which 1 was this test's
// own callback.)
func TestAllocsPerMessage(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, tc := range []struct {
		name   string
		notify bool
		limit  float64
	}{{"AcceptAsync", false, 2.5}, {"AcceptNotify", true, 0.25}} {
		t.Run(tc.name, func(t *testing.T) {
			q, _ := open(t, t.TempDir(), Options{Sync: func(*os.File) error { return nil }, AckFlushInterval: time.Hour})
			ctx := context.Background()
			m := msg("dev-17", 1)
			m.Payload = make([]byte, 100)
			const batch, rounds = 64, 40
			var after uint64
			var reported sync.WaitGroup
			var failed atomic.Pointer[error]
			report := func(err error) {
				if err != nil {
					e := err // only a failure escapes: the callback itself allocates nothing
					failed.Store(&e)
				}
				reported.Done()
			}
			chans := make([]<-chan error, 0, batch)
			seqs := make([]uint64, 0, batch)
			var es []Entry // NextInto's, reused as the link's sender does
			var buf []byte
			round := func() {
				chans = chans[:0]
				for range batch {
					if tc.notify {
						reported.Add(1)
						if pending, err := q.AcceptNotify(ctx, m, report); err != nil || !pending {
							t.Fatalf("AcceptNotify: pending %v, err %v", pending, err)
						}
						continue
					}
					ch, err := q.AcceptAsync(ctx, m)
					if err != nil {
						t.Fatal(err)
					}
					chans = append(chans, ch)
				}
				reported.Wait()
				if p := failed.Load(); p != nil {
					t.Fatal(*p)
				}
				for _, ch := range chans {
					if err := <-ch; err != nil {
						t.Fatal(err)
					}
				}
				seqs = seqs[:0]
				for len(seqs) < batch {
					var err error
					es, buf, err = q.NextInto(ctx, after, batch, es, buf)
					if err != nil {
						t.Fatal(err)
					}
					for _, e := range es {
						seqs = append(seqs, e.Seq)
						after = e.Seq
					}
				}
				if err := q.Ack(seqs...); err != nil {
					t.Fatal(err)
				}
			}
			round() // first batch: buffers and segment bookkeeping grow once
			var before, after2 runtime.MemStats
			runtime.ReadMemStats(&before)
			for range rounds {
				round()
			}
			runtime.ReadMemStats(&after2)
			per := float64(after2.Mallocs-before.Mallocs) / (batch * rounds)
			t.Logf("%.2f allocations per message", per)
			if per > tc.limit {
				t.Errorf("%.2f allocations per message through the queue, want at most %.1f", per, tc.limit)
			}
		})
	}
}

// TestAcceptNotify: the callback form of AcceptAsync. QoS 0 and refusals
// are not pending and never call back; with the fsync held, 20 messages are
// admitted and none is reported; released, each is reported exactly once,
// nil, in acceptance order, after its commit's fsync; a failed fsync is reported to the callback too.
func TestAcceptNotify(t *testing.T) {
	gate, entered, failNext, syncFn := gateSync()
	q, _ := open(t, t.TempDir(), Options{Sync: syncFn})
	ctx := context.Background()
	var mu sync.Mutex
	var got []string // "i:err" in call order
	calls := make(chan struct{}, 64)
	report := func(i int) func(error) {
		return func(err error) {
			mu.Lock()
			got = append(got, fmt.Sprintf("%d:%v", i, err))
			mu.Unlock()
			calls <- struct{}{}
		}
	}
	never := func(error) { t.Error("callback of a message that is not pending") }
	if pending, err := q.AcceptNotify(ctx, bridges.Message{Device: "d", Topic: "devices/d/t/x"}, never); pending || err != nil {
		t.Fatalf("QoS 0: pending %v, err %v; want false, nil", pending, err)
	}
	for i := range 20 {
		if pending, err := q.AcceptNotify(ctx, msg("d", i), report(i)); !pending || err != nil {
			t.Fatalf("AcceptNotify %d: pending %v, err %v", i, pending, err)
		}
	}
	<-entered
	if pending, err := q.AcceptNotify(ctx, bridges.Message{Device: "d", Topic: "devices/d/t/x", QoS: 1, Payload: make([]byte, 300<<10)}, never); pending || !errors.Is(err, ErrTooLarge) {
		t.Fatalf("too large: pending %v, err %v; want false, ErrTooLarge", pending, err)
	}
	select {
	case <-calls:
		t.Fatal("a message was reported while its fsync is held")
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	var want []string
	for i := range 20 {
		want = append(want, fmt.Sprintf("%d:<nil>", i))
		select {
		case <-calls:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of 20 reported within 10s", i)
		}
	}
	mu.Lock()
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("reports (-want +got):\n%s", diff)
	}
	got = nil
	mu.Unlock()

	failNext.Store(true)
	if pending, err := q.AcceptNotify(ctx, msg("d", 99), report(99)); !pending || err != nil {
		t.Fatalf("AcceptNotify: pending %v, err %v", pending, err)
	}
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("failed fsync not reported within 10s")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || !strings.HasPrefix(got[0], "99:") || strings.HasSuffix(got[0], "<nil>") {
		t.Fatalf("after a failed fsync the callback got %q, want one error", got)
	}
}

// Held answers at once: nothing when nothing is held, then what Accept
// wrote, as Next would.
func TestHeldDoesNotWait(t *testing.T) {
	q, _ := open(t, t.TempDir(), Options{})
	ctx := context.Background()
	if es, err := q.Held(0, 10); err != nil || len(es) != 0 {
		t.Fatalf("empty queue: %d entries, %v; want none, nil", len(es), err)
	}
	if err := q.Accept(ctx, msg("d", 1)); err != nil {
		t.Fatal(err)
	}
	es, err := q.Held(0, 10)
	if err != nil || len(es) != 1 {
		t.Fatalf("after one Accept: %d entries, %v; want 1", len(es), err)
	}
	if next, err := q.Next(ctx, 0, 10); err != nil || len(next) != 1 || next[0].Seq != es[0].Seq {
		t.Fatalf("Next disagrees with Held: %+v, %v", next, err)
	}
}

// TestCommitDuringSlowRead: Next reads the disk without the queue's lock,
// so a slow read (an SD card) holds up no device's commit and no Ack.
// What was delivered while it read is not handed out, and what was
// written meanwhile comes next. Before, the read was made under the lock
// and every Accept waited for it.
func TestCommitDuringSlowRead(t *testing.T) {
	var slow atomic.Bool
	entered, release := make(chan struct{}, 1), make(chan struct{})
	q, _ := open(t, t.TempDir(), Options{readAt: func(f *os.File, b []byte, off int64) (int, error) {
		if slow.CompareAndSwap(true, false) {
			entered <- struct{}{}
			<-release
		}
		return f.ReadAt(b, off)
	}})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the queue's Close
	ctx := context.Background()
	accept := func(m bridges.Message) uint64 {
		t.Helper()
		if err := q.Accept(ctx, m); err != nil {
			t.Fatal(err)
		}
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.ents[len(q.ents)-1].seq
	}
	// slowRead calls read (Next or Held) with its first read of the disk
	// held until during has run, and returns the devices of what it
	// handed out.
	slowRead := func(read func() ([]Entry, error), during func()) []string {
		t.Helper()
		slow.Store(true)
		type next struct {
			es  []Entry
			err error
		}
		nexts := make(chan next, 1)
		go func() {
			es, err := read()
			nexts <- next{es, err}
		}()
		select {
		case <-entered:
		case <-time.After(10 * time.Second):
			t.Fatal("no read of the disk within 10 s")
		}
		during()
		release <- struct{}{}
		select {
		case got := <-nexts:
			if got.err != nil {
				t.Fatal(got.err)
			}
			var devs []string
			for _, e := range got.es {
				devs = append(devs, e.Device)
			}
			return devs
		case <-time.After(10 * time.Second):
			t.Fatal("no return within 10 s of the read")
			return nil
		}
	}
	// acceptNow accepts m while a read is held and returns its seq.
	acceptNow := func(m bridges.Message) uint64 {
		t.Helper()
		accepted := make(chan error, 1)
		go func() { accepted <- q.Accept(ctx, m) }()
		select {
		case err := <-accepted:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			unblock()
			<-accepted
			t.Fatal("Accept (admission, write, fsync) waited for a read of the disk")
		}
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.ents[len(q.ents)-1].seq
	}
	next := func(after uint64) func() ([]Entry, error) {
		return func() ([]Entry, error) { return q.Next(ctx, after, 10) }
	}

	a0, a1 := accept(msg("a0", 0)), accept(msg("a1", 0))
	var b, c uint64
	got := slowRead(next(0), func() {
		b = acceptNow(msg("b", 0))
		if err := q.Ack(a1); err != nil { // delivered while Next reads it
			t.Fatal(err)
		}
	})
	if d := cmp.Diff([]string{"a0"}, got); d != "" {
		t.Fatalf("Next with a1 delivered during its read (-want +got):\n%s", d)
	}
	// All it read was delivered meanwhile: what was written since comes,
	// from Next and from Held.
	got = slowRead(next(a1), func() {
		c = acceptNow(msg("c", 0))
		if err := q.Ack(a0, b); err != nil {
			t.Fatal(err)
		}
	})
	if d := cmp.Diff([]string{"c"}, got); d != "" {
		t.Fatalf("Next with b delivered during its read (-want +got):\n%s", d)
	}
	got = slowRead(func() ([]Entry, error) { return q.Held(b, 10) }, func() {
		acceptNow(msg("d", 0))
		if err := q.Ack(c); err != nil {
			t.Fatal(err)
		}
	})
	if d := cmp.Diff([]string{"d"}, got); d != "" {
		t.Fatalf("Held with c delivered during its read (-want +got):\n%s", d)
	}
}

// TestNextInto: NextInto returns what Next returns, reuses the entries and
// buffer it is given (nothing allocated for a batch that fits), and grows
// into a new buffer rather than overwrite what earlier entries of the same
// call point to.
func TestNextInto(t *testing.T) {
	q, _ := open(t, t.TempDir(), Options{})
	ctx := context.Background()
	for i := range 10 {
		if err := q.Accept(ctx, msg(fmt.Sprintf("dev-%d", i%3), i)); err != nil {
			t.Fatal(err)
		}
	}
	want, err := q.Next(ctx, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	es, buf, err := q.NextInto(ctx, 0, 10, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, es); diff != "" {
		t.Fatalf("NextInto vs Next (-want +got):\n%s", diff)
	}
	if n := testing.AllocsPerRun(50, func() {
		es, buf, err = q.NextInto(ctx, 0, 10, es, buf)
	}); n != 0 || err != nil {
		t.Errorf("NextInto with the previous entries and buffer: %.1f allocations, err %v; want 0", n, err)
	}
	if diff := cmp.Diff(want, es); diff != "" {
		t.Fatalf("NextInto, reused (-want +got):\n%s", diff)
	}
	// A buffer too small for the batch: the entries are still all right.
	small := make([]byte, 0, 8)
	es, _, err = q.NextInto(ctx, 0, 10, nil, small)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, es); diff != "" {
		t.Fatalf("NextInto, small buffer (-want +got):\n%s", diff)
	}
	if len(small[:cap(small)]) != 8 || !allZero(small[:cap(small)]) {
		t.Errorf("the small buffer was written: %x", small[:cap(small)])
	}
}

// TestAckInAnyOrderKeepsTheRest: acks in random batches and orders (so
// that reclaim both moves the held entries to the front of its array and
// slices them off) never lose or reorder what is still held, and the
// delivered-marks written on the way survive a reopen.
func TestAckInAnyOrderKeepsTheRest(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{})
	ctx := context.Background()
	const n = 300
	for i := range n {
		if err := q.Accept(ctx, msg("dev-1", i)); err != nil {
			t.Fatal(err)
		}
	}
	all, err := q.Next(ctx, 0, n)
	if err != nil || len(all) != n {
		t.Fatalf("Next: %d entries, %v", len(all), err)
	}
	held := map[uint64]bool{}
	for _, e := range all {
		held[e.Seq] = true
	}
	rng := rand.New(rand.NewPCG(1, 2))
	order := rng.Perm(n)
	// Mostly from the head (the link's order), sometimes anywhere.
	slices.SortStableFunc(order, func(a, b int) int { return a/40 - b/40 })
	for len(order) > 0 {
		k := min(len(order), 1+rng.IntN(12))
		var seqs []uint64
		for _, i := range order[:k] {
			seqs = append(seqs, all[i].Seq)
			delete(held, all[i].Seq)
		}
		order = order[k:]
		if err := q.Ack(seqs...); err != nil {
			t.Fatal(err)
		}
		got, err := q.Held(0, n)
		if err != nil {
			t.Fatal(err)
		}
		var want []uint64
		for _, e := range all {
			if held[e.Seq] {
				want = append(want, e.Seq)
			}
		}
		var gotSeqs []uint64
		for _, e := range got {
			gotSeqs = append(gotSeqs, e.Seq)
		}
		if diff := cmp.Diff(want, gotSeqs); diff != "" {
			t.Fatalf("held after acking %v (-want +got):\n%s", seqs, diff)
		}
		if len(held) == n/2 {
			// Half way: what is held survives a reopen (the marks written
			// with the close).
			if err := q.Close(); err != nil {
				t.Fatal(err)
			}
			q, _ = open(t, dir, Options{})
			got, err := q.Held(0, n)
			if err != nil || len(got) != len(held) {
				t.Fatalf("after reopen %d held, want %d (%v)", len(got), len(held), err)
			}
		}
	}
}

// TestFsyncHistogram: every commit's fsync is observed, so a slow commit
// shows in the buckets though the mean hides it.
func TestFsyncHistogram(t *testing.T) {
	var n int
	// Only the second commit is slow; the others do not touch the disk, so
	// a loaded machine's own slow fsync cannot land in the 5 ms bucket.
	q, reg := open(t, t.TempDir(), Options{Sync: func(f *os.File) error {
		n++ // the writer goroutine only
		if n == 2 {
			time.Sleep(6 * time.Millisecond)
		}
		return nil
	}})
	ctx := context.Background()
	for i := range 3 {
		if err := q.Accept(ctx, msg("d1", i)); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var h *dto.Histogram
	for _, mf := range mfs {
		if mf.GetName() == "bastion_queue_fsync_seconds" {
			h = mf.GetMetric()[0].GetHistogram()
		}
	}
	if h == nil {
		t.Fatal("no bastion_queue_fsync_seconds histogram")
	}
	// fsyncs_total also counts the new segment's and its directory's, and
	// the directory's after the open moved the sequence floor.
	if got, all := h.GetSampleCount(), metricValue(t, reg, "bastion_queue_fsyncs_total"); got != 3 || all != 6 {
		t.Fatalf("histogram count %v, fsyncs_total %v, want 3 commits of 6 fsyncs", got, all)
	}
	if h.GetSampleSum() < 0.006 {
		t.Errorf("histogram sum %vs, want ≥ 6 ms (one fsync slept that long)", h.GetSampleSum())
	}
	var le5ms *dto.Bucket
	for _, b := range h.GetBucket() {
		if b.GetUpperBound() == 0.005 {
			le5ms = b
		}
	}
	if le5ms == nil {
		t.Fatal("no 5 ms bucket")
	}
	if le5ms.GetCumulativeCount() != 2 {
		t.Errorf("fsyncs ≤ 5 ms: %d, want 2 (the 6 ms one above)", le5ms.GetCumulativeCount())
	}
}

// TestSeqNotReusedAfterLostBatch: the link may send a batch once it is
// written, before its fsync returns. If the power fails then, the batch is
// not on disk but its sequence numbers are in the cloud; a message
// accepted after the restart must not get one of them, or a cloud that
// drops duplicates by bastion-origin and bastion-seq would drop it. The
// disk after the power cut is the directory as it was before the batch
// was written (its write never reached the disk). Messages that were on
// disk keep their sequence numbers (their resends are duplicates).
func TestSeqNotReusedAfterLostBatch(t *testing.T) {
	dir := t.TempDir()
	var hold atomic.Bool
	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	q, _ := open(t, dir, Options{Sync: func(f *os.File) error {
		if hold.Load() {
			entered <- struct{}{}
			<-gate
		}
		return f.Sync()
	}})
	ctx := context.Background()
	for i := range 3 {
		if err := q.Accept(ctx, msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	durable := drain(t, q)
	if len(durable) != 3 {
		t.Fatalf("held %d messages, want 3", len(durable))
	}
	lost := t.TempDir()
	if err := os.CopyFS(lost, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}

	hold.Store(true)
	done, err := q.AcceptAsync(ctx, msg("b", 0))
	if err != nil {
		t.Fatal(err)
	}
	<-entered
	sent, err := q.Next(ctx, durable[2].Seq, 10) // the link sends it before the fsync returns
	if err != nil || len(sent) != 1 {
		t.Fatalf("Next during the held fsync: %v, %v; want the written message", sent, err)
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	q.Close()

	after := reopenAfterCut(t, lost)
	for i, e := range after[:3] {
		if e.Seq != durable[i].Seq {
			t.Errorf("durable message %d came back as seq %d, was %d: its resend would not be recognised as a duplicate", i, e.Seq, durable[i].Seq)
		}
	}
	if got := after[3].Seq; got <= sent[0].Seq {
		t.Fatalf("message accepted after the power cut got seq %d; seq %d was already sent upstream for another message (seqs must never be reused)", got, sent[0].Seq)
	}
}

// TestSeqNotReusedAfterLostFirstBatch: the first batch after an open is
// numbered past the gap that open skipped, not right after the last seq on
// disk. If the power fails after the link sent it but before its fsync,
// the disk holds what it held before that open, and the next open must
// still not give its numbers out again: the floor that open made durable
// before giving out any number is past them. The disk after the power cut
// is the directory as it was when that open returned.
func TestSeqNotReusedAfterLostFirstBatch(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	q1, _ := open(t, dir, Options{})
	for i := range 3 {
		if err := q1.Accept(ctx, msg("a", i)); err != nil {
			t.Fatal(err)
		}
	}
	q1.Close()

	q2, _, g := openGated(t, dir, Options{})
	lost := t.TempDir()
	if err := os.CopyFS(lost, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	held := drain(t, q2)
	if len(held) != 3 {
		t.Fatalf("held %d messages after reopen, want 3", len(held))
	}
	done := admit(t, q2, msg("b", 0))
	h := g.next(t, "the first batch after the open")
	sent, err := q2.Next(ctx, held[2].Seq, 10) // the link sends it before the fsync returns
	if err != nil || len(sent) != 1 {
		t.Fatalf("Next during the held fsync: %v, %v; want the written message", sent, err)
	}
	h.release <- nil
	if err := result(t, done); err != nil {
		t.Fatal(err)
	}
	q2.Close()

	after := reopenAfterCut(t, lost)
	if got := after[3].Seq; got <= sent[0].Seq {
		t.Fatalf("message accepted after the power cut got seq %d; seq %d was already sent upstream for another message (seqs must never be reused)", got, sent[0].Seq)
	}
}

// TestDroppingEverythingHeldKeepsAccepting: when held drops what the disk
// cannot read (here every held message of a full queue, after the grace),
// nothing is held any more, so no Ack comes to trim the dropped entries or
// remove their segments. The queue must then accept again: before, it
// refused every message for good, by age (the oldest of no held message
// read as the zero time, 292 years old) and by bytes (the dropped
// segments still counted).
func TestDroppingEverythingHeldKeepsAccepting(t *testing.T) {
	var broken atomic.Bool
	var clock atomic.Int64
	clock.Store(epoch.UnixNano())
	q, reg := open(t, t.TempDir(), Options{
		MaxBytes: 8 << 10, SegmentBytes: 2 << 10,
		Now: func() time.Time { return time.Unix(0, clock.Load()) },
		readAt: func(f *os.File, b []byte, off int64) (int, error) {
			if broken.Load() {
				return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.EIO}
			}
			return f.ReadAt(b, off)
		},
	})
	ctx := context.Background()
	n := 0
	for ; ; n++ {
		if err := q.Accept(ctx, msg("a", n)); errors.Is(err, bridges.ErrQueueFull) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	broken.Store(true)
	// Each Next starts the clock of the next unreadable messages or, after
	// the grace, drops them.
	for i := 0; ; i++ {
		if i > 4*n {
			t.Fatalf("still holding %d of %d unreadable messages after %d tries", q.Stats().Depth, n, i)
		}
		nctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		_, err := q.Next(nctx, 0, 1000)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			break
		}
		clock.Add(int64(unreadableGrace))
	}
	if v := metricValue(t, reg, "bastion_queue_unreadable_dropped_total"); v != float64(n) {
		t.Fatalf("dropped %v of %d", v, n)
	}
	broken.Store(false)
	if err := q.Accept(ctx, msg("b", 0)); err != nil {
		t.Fatalf("Accept after every held message was dropped: %v", err)
	}
	if es := drain(t, q); len(es) != 1 || es[0].Device != "b" {
		t.Fatalf("held after the drop: %v, want only the new message", es)
	}
}

// TestUnreadableHeader: a segment whose first block the disk cannot read
// (EIO) reads back with zeros in place of its magic. That is neither a
// torn creation (removed at open) nor a foreign file (refused). Its salt
// is unreadable with it, so its records past the block cannot be told from
// records a device embedded in a payload: none is taken, but the file is
// kept (not reclaimed) and read whole once the disk reads it again. The
// segment's name still counts for the next sequence number, and commits
// go to a new segment instead of into the unreadable block.
// Before, such a segment was removed as a torn creation when its records
// all lay in that block (and the queue started again at seq 1 if it was
// the only one), and refused as "bad magic" otherwise.
func TestUnreadableHeader(t *testing.T) {
	const block = 4 << 10
	opts := Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20, readRetries: []time.Duration{0, 0}}
	// unreadable fails reads of seg's first block: that file, not
	// another one made later under its name (kept open, so that its inode
	// number is not given to that one).
	unreadable := func(t *testing.T, o Options, seg string) Options {
		keep, err := os.Open(seg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { keep.Close() })
		was, err := keep.Stat()
		if err != nil {
			t.Fatal(err)
		}
		o.readAt = func(f *os.File, b []byte, off int64) (int, error) {
			if fi, err := f.Stat(); err == nil && os.SameFile(fi, was) && off < block {
				return 0, &os.PathError{Op: "read", Path: f.Name(), Err: syscall.EIO}
			}
			return f.ReadAt(b, off)
		}
		return o
	}
	payloads := func(es []Entry) []int {
		var got []int
		for _, e := range es {
			var i int
			fmt.Sscanf(string(e.Payload), `{"i":%d}`, &i)
			got = append(got, i)
		}
		return got
	}
	ctx := context.Background()

	t.Run("records past the block", func(t *testing.T) {
		dir := t.TempDir()
		q, _ := open(t, dir, opts)
		var past []int // the messages whose records lie past the block
		var seg string
		var lastSeq uint64
		for i := 0; activeSize(q) < 2*block; i++ {
			if err := q.Accept(ctx, msg("a", i)); err != nil {
				t.Fatal(err)
			}
			q.mu.Lock()
			if e := q.ents[len(q.ents)-1]; e.off >= block {
				past = append(past, i)
			}
			seg, lastSeq = q.segs[0].path, q.ents[len(q.ents)-1].seq
			q.mu.Unlock()
		}
		all := len(drain(t, q))
		q.Close()

		q2, err := Open(dir, unreadable(t, opts, seg), discard, nil)
		if err != nil {
			t.Fatalf("Open with the segment's header unreadable: %v", err)
		}
		defer q2.Close()
		if len(past) == 0 {
			t.Fatal("no record past the block")
		}
		if got := payloads(drain(t, q2)); len(got) != 0 {
			t.Fatalf("held with the first block (and the salt) unreadable: %v, want none", got)
		}
		if err := q2.Accept(ctx, msg("b", 0)); err != nil {
			t.Fatalf("Accept: %v", err)
		}
		if active := activePath(q2); active == seg {
			t.Fatalf("commits go to %s, whose first block is unreadable", seg)
		}
		q2.Close()
		// The disk reads again: the segment is all there, untouched.
		q3, _ := open(t, dir, opts)
		es := drain(t, q3)
		if len(es) != all+1 || es[len(es)-1].Device != "b" || es[len(es)-1].Seq <= lastSeq {
			t.Fatalf("after the disk came back: %d messages (last %+v), want the %d first and then b past seq %d", len(es), es[len(es)-1], all, lastSeq)
		}
	})

	// An unverified segment before the active one holds no message, so
	// nothing waits for it: the delivered segments after it are removed
	// (it is kept, never removed), and the queue keeps accepting for as
	// long as the link delivers. Before, reclaim stopped at it: every
	// segment after it stayed until the queue was full by bytes, refusing
	// every message for good (the next open found the same).
	t.Run("delivered segments after it are reclaimed", func(t *testing.T) {
		dir := t.TempDir()
		o := opts
		o.MaxBytes = 64 << 10
		q, _ := open(t, dir, o)
		var oldSeqs []uint64 // the messages in the segment that becomes unreadable
		for i := 0; segCount(q) < 2; i++ {
			if err := q.Accept(ctx, msg("a", i)); err != nil {
				t.Fatal(err)
			}
		}
		q.mu.Lock()
		seg := q.segs[0].path
		for _, e := range q.ents {
			if e.seg == q.segs[0] {
				oldSeqs = append(oldSeqs, e.seq)
			}
		}
		q.mu.Unlock()
		q.Close()

		q2, err := Open(dir, unreadable(t, o, seg), discard, nil)
		if err != nil {
			t.Fatalf("Open with the segment's header unreadable: %v", err)
		}
		defer q2.Close()
		big := func(i int) bridges.Message {
			m := msg("b", i)
			m.Payload = make([]byte, 500)
			return m
		}
		// Well over MaxBytes accepted and delivered, a few at a time.
		for i := 0; i < 8*int(o.MaxBytes)/500; {
			for range 10 {
				if err := q2.Accept(ctx, big(i)); err != nil {
					t.Fatalf("Accept %d (%d bytes accepted and delivered before): %v; stats %+v", i, i*500, err, q2.Stats())
				}
				i++
			}
			es, err := q2.Held(0, 1000)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range es {
				q2.Ack(e.Seq)
			}
		}
		if _, err := os.Stat(seg); err != nil {
			t.Fatalf("the segment whose header cannot be read was removed: %v", err)
		}
		if st := q2.Stats(); st.Bytes > o.MaxBytes || st.Depth != 0 {
			t.Fatalf("stats after everything was delivered: %+v; want bytes within %d, depth 0", st, o.MaxBytes)
		}
		// Full again, undelivered: the refusal says where the bytes are
		// that no delivery frees.
		var full error
		for i := 0; full == nil; i++ {
			if i > int(o.MaxBytes) {
				t.Fatal("never full")
			}
			full = q2.Accept(ctx, big(i))
		}
		if !errors.Is(full, bridges.ErrQueueFull) || !strings.Contains(full.Error(), filepath.Base(seg)) || !strings.Contains(full.Error(), "header the disk cannot read") {
			t.Fatalf("refused when full: %v; want ErrQueueFull naming %s, whose header cannot be read", full, filepath.Base(seg))
		}
		q2.Close()
		// The disk reads it again: its messages are back, under their
		// seqs (the ones delivered before are duplicates the cloud drops).
		q3, _ := open(t, dir, o)
		es := drain(t, q3)
		var got []uint64
		for _, e := range es[:min(len(oldSeqs), len(es))] {
			got = append(got, e.Seq)
		}
		if !slices.Equal(got, oldSeqs) {
			t.Fatalf("after the disk came back, held first %v; want the unreadable segment's %v", got, oldSeqs)
		}
	})

	// Followed only by a segment whose creation was cut (removed at
	// open), it is the last one: commits go to a new segment. Before, it
	// was not taken for the last, commits were appended to it unkeyed, and
	// the open that read its salt again cut them: acknowledged messages
	// lost.
	t.Run("before a torn creation", func(t *testing.T) {
		dir := t.TempDir()
		q, _ := open(t, dir, opts)
		for i := range 3 {
			if err := q.Accept(ctx, msg("a", i)); err != nil {
				t.Fatal(err)
			}
		}
		q.mu.Lock()
		seg, next := q.segs[0].path, q.nextSeq
		q.mu.Unlock()
		q.Close()
		if err := os.WriteFile(segName(dir, next), make([]byte, 8<<10), 0o600); err != nil {
			t.Fatal(err)
		}
		// Segments larger from now on: the old one's preallocated end
		// leaves room, so a commit does not start a new segment anyway.
		big := opts
		big.SegmentBytes = 4 * opts.SegmentBytes
		q2, err := Open(dir, unreadable(t, big, seg), discard, nil)
		if err != nil {
			t.Fatalf("Open with the segment's header unreadable: %v", err)
		}
		defer q2.Close()
		if err := q2.Accept(ctx, msg("b", 0)); err != nil {
			t.Fatalf("Accept: %v", err)
		}
		if active := activePath(q2); active == seg {
			t.Fatalf("commits go to %s, whose header is unreadable", seg)
		}
		q2.Close()
		q3, _ := open(t, dir, big)
		if es := drain(t, q3); len(es) != 4 || es[3].Device != "b" {
			t.Fatalf("after the disk came back: %+v; want a's 3 messages, then b", es)
		}
	})

	t.Run("records only in the block, no floor", func(t *testing.T) {
		dir := t.TempDir()
		q, _ := open(t, dir, opts)
		for i := range 3 {
			if err := q.Accept(ctx, msg("a", i)); err != nil {
				t.Fatal(err)
			}
		}
		sent := drain(t, q)
		q.mu.Lock()
		seg := q.segs[0].path
		q.mu.Unlock()
		q.Close()
		// A queue written before the sequence floor existed.
		floors, _ := filepath.Glob(filepath.Join(dir, floorPrefix+"*"))
		for _, f := range floors {
			os.Remove(f)
		}
		q2, err := Open(dir, unreadable(t, opts, seg), discard, nil)
		if err != nil {
			t.Fatalf("Open with the segment's header unreadable: %v", err)
		}
		defer q2.Close()
		if err := q2.Accept(ctx, msg("b", 0)); err != nil {
			t.Fatalf("Accept: %v", err)
		}
		es := drain(t, q2)
		if len(es) != 1 || es[0].Seq <= sent[2].Seq {
			t.Fatalf("held %v; want only b, past seq %d (given out before, maybe sent upstream already)", es, sent[2].Seq)
		}
	})
}

// TestMaxMessageBytesWithinRecordLimit: a MaxMessageBytes whose records
// the decoder would refuse (body above maxRecBody) is refused by Open;
// before, such a message was accepted and acknowledged, then dropped as
// corrupt. A message at the highest allowed limit survives a reopen.
func TestMaxMessageBytesWithinRecordLimit(t *testing.T) {
	if q, err := Open(t.TempDir(), Options{MaxMessageBytes: maxRecBody}, discard, nil); err == nil {
		q.Close()
		t.Fatalf("Open accepted MaxMessageBytes %d: its messages' records are above the decoder's %d", maxRecBody, maxRecBody)
	}
	dir := t.TempDir()
	opts := Options{MaxMessageBytes: maxRecBody - msgOverhead, MaxBytes: 16 << 20, SegmentBytes: 64 << 10, Sync: func(*os.File) error { return nil }}
	q, _ := open(t, dir, opts)
	m := msg("a", 0)
	m.Payload = make([]byte, opts.MaxMessageBytes-len(m.Device)-len(m.Topic))
	m.Payload[len(m.Payload)-1] = 1
	// Its widest record (the longest seq and time) still decodes.
	w := m
	w.Received = time.Unix(0, math.MinInt64)
	if _, _, err := decodeRecord(appendMsg(nil, math.MaxUint64, &w)); err != nil {
		t.Fatalf("the widest record of a message at the limit: %v", err)
	}
	if err := q.Accept(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	q.Close()
	q2, _ := open(t, dir, opts)
	if es := drain(t, q2); len(es) != 1 || len(es[0].Payload) != len(m.Payload) {
		t.Fatalf("after reopen %d messages, want the one at the limit", len(es))
	}
}

// TestEmbeddedChainKeyedNotTaken: in a keyed segment, records a device
// embeds in its payload with the public, unkeyed checksum (one whose seq
// is at or above seqCeiling, alone or after one with a plausible seq) are
// not taken when its own record is torn (here its checksum): each fails
// the keyed checksum, so resync finds none and the seq ceiling is never
// consulted (the test passes with recover's ceiling checks removed). The
// ceiling is the defence in a v1 segment, whose checksum a device can
// compute: TestV1EmbeddedRecordAboveCeilingNotTaken. A single plausible
// record: TestEmbeddedRecordKeyedNotTaken.
func TestEmbeddedChainKeyedNotTaken(t *testing.T) {
	for _, chain := range []bool{false, true} {
		t.Run(fmt.Sprintf("chain=%v", chain), func(t *testing.T) {
			dir := t.TempDir()
			ctx := context.Background()
			q, _ := open(t, dir, Options{})
			if err := q.Accept(ctx, msg("a", 0)); err != nil {
				t.Fatal(err)
			}
			q.mu.Lock()
			lastSeq := q.ents[0].seq
			q.mu.Unlock()
			var forged []byte
			if chain {
				v := msg("victim", 1)
				forged = appendMsg(forged, lastSeq+1, &v)
			}
			v := msg("victim", 2)
			forged = appendMsg(forged, seqCeiling+5, &v)
			m := msg("mallory", 0)
			m.Payload = forged
			if err := q.Accept(ctx, m); err != nil {
				t.Fatal(err)
			}
			// A genuine message after it: resync skips the torn record
			// to it.
			if err := q.Accept(ctx, msg("b", 0)); err != nil {
				t.Fatal(err)
			}
			closeTearingChecksum(t, q, 1)

			q2, _ := open(t, dir, Options{})
			if err := q2.Accept(ctx, msg("c", 0)); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range drain(t, q2) {
				if e.Seq >= seqCeiling {
					t.Errorf("held seq %d from %s (%s): at or above %d, no open gives that out", e.Seq, e.Device, e.Payload, uint64(seqCeiling))
				}
				got = append(got, e.Device)
			}
			// The genuine messages are held: a reopen that held nothing
			// does not pass.
			if d := cmp.Diff([]string{"a", "b", "c"}, got); d != "" {
				t.Errorf("devices of the messages held after reopen (-want +got):\n%s", d)
			}
		})
	}
}

// TestOpenRefusesSeqNearCeiling: recover takes no message record at or
// above seqCeiling, so Open must refuse a next sequence number from which
// this open or the next would give such numbers out: their acknowledged
// messages would be dropped at the next open. A sequence floor or a
// segment name is where such a number comes from (damaged or forged).
// Before, Open refused only near 2^64, and a segment name near 2^64
// wrapped the next number back to small ones.
func TestOpenRefusesSeqNearCeiling(t *testing.T) {
	gap := seqGap(64 << 20)
	floorFile := func(v uint64) func(dir string) {
		return func(dir string) {
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf(floorPrefix+"%020d", v)), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	segFile := func(base uint64) func(dir string) {
		return func(dir string) {
			hdr, _ := newSegHeader()
			if err := os.WriteFile(segName(dir, base), hdr, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, c := range []struct {
		name string
		make func(dir string)
	}{
		{"floor one gap below", floorFile(seqCeiling - gap)},
		{"floor at the limit", floorFile(seqCeiling - 2*gap)},
		{"floor above the ceiling", floorFile(seqCeiling + 1)},
		{"segment two gaps below", segFile(seqCeiling - 2*gap)},
		{"segment near 2^64", segFile(math.MaxUint64 - 5)},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			c.make(dir)
			q, err := Open(dir, Options{}, discard, nil)
			if err == nil {
				q.mu.Lock()
				next := q.nextSeq
				q.mu.Unlock()
				q.Close()
				t.Fatalf("Open succeeded with next seq %d; want it refused (at or above %d - 2*%d)", next, uint64(seqCeiling), gap)
			}
			if !strings.Contains(err.Error(), "move the queue directory away") {
				t.Fatalf("Open: %v; want the refusal saying what to do", err)
			}
		})
	}
	// Just below the limit: it opens, and what it accepts is kept.
	dir := t.TempDir()
	floorFile(seqCeiling - 2*gap - 1)(dir)
	q, _ := open(t, dir, Options{})
	if err := q.Accept(context.Background(), msg("d", 0)); err != nil {
		t.Fatal(err)
	}
	es := drain(t, q)
	if len(es) != 1 || es[0].Seq >= seqCeiling {
		t.Fatalf("held %v", es)
	}
}

// closeTearingChecksum closes q and breaks the checksum of its i-th held
// record on disk, as a torn write would: recovery must resync past it.
func closeTearingChecksum(t *testing.T, q *Queue, i int) {
	t.Helper()
	q.mu.Lock()
	bad := q.ents[i]
	q.mu.Unlock()
	q.Close()
	f, err := os.OpenFile(bad.seg.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{0xde, 0xad}, bad.off+4); err != nil { // its checksum
		t.Fatal(err)
	}
}

// reopenAfterCut opens the queue in dir after a simulated power cut that
// kept 3 durable messages, accepts one more and returns all 4 held.
func reopenAfterCut(t *testing.T, dir string) []Entry {
	t.Helper()
	q, _ := open(t, dir, Options{})
	if err := q.Accept(context.Background(), msg("c", 0)); err != nil {
		t.Fatal(err)
	}
	after := drain(t, q)
	if len(after) != 4 {
		t.Fatalf("after the power cut the queue holds %d messages, want the 3 durable ones and the new one", len(after))
	}
	return after
}

// TestResumeWaitOnFullDisk: a queue stopped by a full disk tries again at
// least every 30 s however long the disk stays full (room made by the
// operator is found soon); other disk errors back off to 5 min.
func TestResumeWaitOnFullDisk(t *testing.T) {
	full := fmt.Errorf("queue: create segment: %w", syscall.ENOSPC)
	eio := fmt.Errorf("queue: write: %w", syscall.EIO)
	w, e := resumeFirst, resumeFirst
	for range 20 {
		w, e = nextResumeWait(w, full), nextResumeWait(e, eio)
	}
	if w != 30*time.Second || e != 5*time.Minute {
		t.Fatalf("after 20 failed resumes: wait %s on a full disk (want 30s), %s on EIO (want 5m)", w, e)
	}
	if got := nextResumeWait(10*time.Second, full); got != 20*time.Second {
		t.Fatalf("first doubling on a full disk: %s, want 20s", got)
	}
}

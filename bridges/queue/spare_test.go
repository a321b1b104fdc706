package queue

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// spareReady waits until the queue holds a prepared next segment.
func spareReady(t *testing.T, q *Queue) *os.File {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		q.mu.Lock()
		f := q.spare
		q.mu.Unlock()
		if f != nil {
			return f
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no next segment prepared once the active one was over half full")
	return nil
}

func activeSize(q *Queue) int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.segs[len(q.segs)-1].size
}

// activePath is the file of the segment commits go to.
func activePath(q *Queue) string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.segs[len(q.segs)-1].path
}

func segCount(q *Queue) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.segs)
}

// TestRotationUsesPreparedSegment: the next segment is written and synced
// while the active one fills, and the rotation renames it instead of
// writing SegmentBytes of zeros while every device waits for that commit.
func TestRotationUsesPreparedSegment(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20})
	ctx := context.Background()
	i := 0
	for activeSize(q) < 9<<10 { // over half: the spare is started
		if err := q.Accept(ctx, msg("d", i)); err != nil {
			t.Fatal(err)
		}
		i++
	}
	spare := spareReady(t, q)
	before, err := spare.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, spareName)); err != nil || fi.Size() != 16<<10 {
		t.Fatalf("prepared segment on disk: %v, %v; want %d bytes", fi, err, 16<<10)
	}

	var created atomic.Int32
	q.creating = func(*os.File) { created.Add(1) } // a segment written at the rotation
	for segCount(q) < 2 {
		if err := q.Accept(ctx, msg("d", i)); err != nil {
			t.Fatal(err)
		}
		i++
	}
	if n := created.Load(); n != 0 {
		t.Fatalf("the rotation wrote %d new segment(s); want the prepared one renamed", n)
	}
	q.mu.Lock()
	active := q.segs[1]
	q.mu.Unlock()
	after, err := os.Stat(active.path)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) {
		t.Fatalf("the new segment %s is not the prepared file", active.path)
	}
	if active.f.Name() != active.path {
		t.Errorf("the new segment's file is named %s, want %s (its errors would name the spare)", active.f.Name(), active.path)
	}
	if _, err := os.Stat(filepath.Join(dir, spareName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s still there after the rotation took it: %v", spareName, err)
	}

	// Every message is there after a reopen, across the two segments.
	q.Close()
	q2, _ := open(t, dir, Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20})
	if got := len(drain(t, q2)); got != i {
		t.Fatalf("messages after reopen = %d, want %d", got, i)
	}
}

// TestSpareLeftByACrashIsRemoved: a prepared segment holds no message;
// one left behind (a crash, a failed preparation) is removed at open and
// never read as a segment.
func TestSpareLeftByACrashIsRemoved(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{})
	for i := range 3 {
		if err := q.Accept(context.Background(), msg("d", i)); err != nil {
			t.Fatal(err)
		}
	}
	q.Close()
	if err := os.WriteFile(filepath.Join(dir, spareName), []byte("BSTQ half-written garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	q2, _ := open(t, dir, Options{})
	if got := len(drain(t, q2)); got != 3 {
		t.Fatalf("messages = %d, want 3", got)
	}
	if _, err := os.Stat(filepath.Join(dir, spareName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale %s not removed at open: %v", spareName, err)
	}
}

// TestCloseRemovesUnusedSpare: a clean shutdown leaves only segments.
func TestCloseRemovesUnusedSpare(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20})
	for i := 0; activeSize(q) < 9<<10; i++ {
		if err := q.Accept(context.Background(), msg("d", i)); err != nil {
			t.Fatal(err)
		}
	}
	spareReady(t, q)
	q.Close()
	if _, err := os.Stat(filepath.Join(dir, spareName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s left after Close: %v", spareName, err)
	}
}

// TestSpareFailureFallsBack: when the spare cannot be made (here its name
// is taken by a directory), the rotation writes the new segment itself and
// nothing is refused.
func TestSpareFailureFallsBack(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20})
	if err := os.Mkdir(filepath.Join(dir, spareName), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, spareName, "x"), nil, 0o600); err != nil {
		t.Fatal(err) // a non-empty directory: Remove fails too
	}
	var created atomic.Int32
	q.creating = func(*os.File) { created.Add(1) }
	i := 0
	for segCount(q) < 2 {
		if err := q.Accept(context.Background(), msg("d", i)); err != nil {
			t.Fatal(err)
		}
		i++
	}
	if created.Load() == 0 {
		t.Fatal("no segment written at the rotation, and no spare could exist")
	}
	q.mu.Lock()
	retry := q.spareRetry
	q.mu.Unlock()
	if retry.IsZero() {
		t.Fatal("the failed preparation was not noted (it would be tried again at every commit)")
	}
}

// TestRotationNeverReplacesASegment: after a failed fsync, resume starts a
// segment named after the next seq while a prepared spare waits; a
// delivered-mark written there makes it look used, and the next batch,
// which starts at that same seq, does not fit what is left of it. The
// rotation must not rename the spare over it (the batch is written there
// instead): before, the spare replaced its file under its name, and once
// the marks' segment was reclaimed its removal unlinked the file holding
// the acknowledged batch.
func TestRotationNeverReplacesASegment(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentBytes: 16 << 10, MaxBytes: 1 << 20, AckFlushInterval: 10 * time.Millisecond, resumeAfter: 10 * time.Millisecond}
	q, _, g := openGated(t, dir, opts)
	for i := 0; activeSize(q) < 9<<10; i++ {
		ch := admit(t, q, msg("d", i))
		g.next(t, "a small batch").release <- nil
		if err := result(t, ch); err != nil {
			t.Fatal(err)
		}
	}
	spareReady(t, q)
	ch := admit(t, q, msg("d", -1))
	g.next(t, "the failing batch").release <- errors.New("EIO from the test")
	if err := result(t, ch); err == nil {
		t.Fatal("batch reported durable after its fsync failed")
	}
	deadline := time.Now().Add(10 * time.Second)
	for q.Stats().Err != nil {
		if time.Now().After(deadline) {
			t.Fatal("no resume within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	held := drain(t, q)
	if err := q.Ack(held[0].Seq); err != nil {
		t.Fatal(err)
	}
	for activeSize(q) == int64(segHeader) { // the mark, written to resume's segment
		if time.Now().After(deadline) {
			t.Fatal("delivered-mark not written within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	big := msg("d", 1000)
	big.Payload = make([]byte, 16<<10)
	ch = admit(t, q, big)
	g.next(t, "the big batch").release <- nil
	if err := result(t, ch); err != nil {
		t.Fatal(err)
	}
	for _, e := range held[1:] { // the old segments are reclaimed
		q.Ack(e.Seq)
	}
	// Close commits the marks left, if any: the periodic flush may have
	// committed them already, and then Close starts no fsync (waiting for
	// exactly one here failed once in 4 -race runs on a loaded box).
	closed := make(chan error, 1)
	go func() { closed <- q.Close() }()
	for done := false; !done; {
		select {
		case h := <-g.started:
			h.release <- nil
		case err := <-closed:
			if err != nil {
				t.Fatal(err)
			}
			done = true
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return within 10 s")
		}
	}

	q2, _ := open(t, dir, opts)
	es := drain(t, q2)
	if len(es) == 0 || len(es[len(es)-1].Payload) != 16<<10 {
		t.Fatalf("after reopen %d messages, the last %d bytes; want the acknowledged 16 KiB one last", len(es), func() int {
			if len(es) == 0 {
				return -1
			}
			return len(es[len(es)-1].Payload)
		}())
	}
}

//go:build linux

package queue

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAIOFsync: the asynchronous fsync syncs a real file, reports a file
// system without fsync as unsupported (so the queue falls back), and a
// closed file as an error.
func TestAIOFsync(t *testing.T) {
	a, err := newAIOFsync()
	if err != nil {
		// The CI machine has native AIO; a kernel or sandbox without it
		// is what the fallback is for, tested below.
		t.Fatalf("newAIOFsync: %v", err)
	}
	defer a.close()
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 { // the eventfd and the context are reused
		if _, err := f.Write([]byte("record")); err != nil {
			t.Fatal(err)
		}
		if err := a.fsync(f); err != nil {
			t.Fatalf("aio fsync: %v", err)
		}
	}
	// The eventfd stays non-blocking, so that waiting parks the goroutine
	// in the poller instead of blocking a thread.
	fl, err := unix.FcntlInt(a.efd.Fd(), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Error("the eventfd was put in blocking mode")
	}
	f.Close()
	if err := a.fsync(f); err == nil || errors.Is(err, errAIOUnsupported) {
		t.Errorf("aio fsync of a closed file: %v, want an error that is not 'unsupported'", err)
	}
	// A pipe has no fsync: io_submit refuses it with EINVAL.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := a.fsync(w); !errors.Is(err, errAIOUnsupported) || !errors.Is(err, syscall.EINVAL) {
		t.Errorf("aio fsync of a pipe: %v, want unsupported (EINVAL)", err)
	}
}

// TestDefaultSyncWithOneP: with one P the queue's fsync goes through AIO;
// where AIO cannot sync the file it falls back for good to the blocking
// fsync, whose own error comes back.
func TestDefaultSyncWithOneP(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	q := &Queue{log: discard}
	defer func() {
		if q.aio != nil {
			q.aio.close()
		}
	}()
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := q.defaultSync(f); err != nil {
		t.Fatalf("defaultSync: %v", err)
	}
	if q.aio == nil || q.noAIO {
		t.Fatalf("one P: aio %v, noAIO %v; want the asynchronous fsync in use", q.aio, q.noAIO)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := q.defaultSync(w); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("defaultSync of a pipe: %v, want the blocking fsync's EINVAL", err)
	}
	if q.aio != nil || !q.noAIO {
		t.Errorf("after AIO refused the file: aio %v, noAIO %v; want the fallback for good", q.aio, q.noAIO)
	}
	if err := q.defaultSync(f); err != nil {
		t.Errorf("defaultSync after the fallback: %v", err)
	}
}

func TestUseAIO(t *testing.T) {
	for procs, want := range map[int]bool{1: true, 2: false, 8: false} {
		if got := useAIO(procs); got != want {
			t.Errorf("useAIO(%d) = %v, want %v", procs, got, want)
		}
	}
}

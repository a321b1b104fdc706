package queue

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestUseRawSync(t *testing.T) {
	for name, c := range map[string]struct {
		procs int
		mean  time.Duration
		want  bool
	}{
		"two Ps, fast disk":        {2, 300 * time.Microsecond, true},
		"first commit (no mean)":   {4, 0, false},
		"one P":                    {1, 300 * time.Microsecond, false},
		"slow disk":                {2, rawSyncBelow, false},
		"slow disk, many Ps":       {8, 20 * time.Millisecond, false},
		"just under the threshold": {2, rawSyncBelow - time.Microsecond, true},
	} {
		if got := useRawSync(c.procs, c.mean); got != c.want {
			t.Errorf("%s: useRawSync(%d, %v) = %v, want %v", name, c.procs, c.mean, got, c.want)
		}
	}
}

// TestRawFsync: the raw fsync syncs a real file and reports the kernel's
// errors as os.File.Sync does.
func TestRawFsync(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("record")); err != nil {
		t.Fatal(err)
	}
	if err := rawFsync(f); err != nil {
		t.Fatalf("rawFsync: %v", err)
	}
	f.Close()
	if err := rawFsync(f); err == nil {
		t.Error("rawFsync on a closed file: no error")
	}
	// fsync(2) on a pipe fails with EINVAL: the kernel's error comes back.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := rawFsync(w); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("rawFsync on a pipe: %v, want EINVAL", err)
	}
}

// TestRawPwritePread: the raw pwrite and pread behave as WriteAt and
// ReadAt on a real file: bytes land where asked, a read past the end
// returns what is there and io.EOF, a closed file is an error.
func TestRawPwritePread(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := rawPwrite(f, []byte("hello world"), 4); n != 11 || err != nil {
		t.Fatalf("rawPwrite = %d, %v", n, err)
	}
	want := make([]byte, 15)
	if _, err := f.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want, append(make([]byte, 4), "hello world"...)) {
		t.Fatalf("file holds %q", want)
	}
	got := make([]byte, 5)
	if n, err := rawPread(f, got, 10); n != 5 || err != nil || string(got) != "world" {
		t.Fatalf("rawPread = %d %q, %v; want 5 \"world\"", n, got, err)
	}
	long := make([]byte, 8)
	n, err := rawPread(f, long, 10)
	wn, werr := f.ReadAt(make([]byte, 8), 10)
	if n != wn || !errors.Is(err, io.EOF) || !errors.Is(werr, io.EOF) || string(long[:n]) != "world" {
		t.Fatalf("rawPread past the end = %d %q, %v; ReadAt gives %d, %v", n, long[:n], err, wn, werr)
	}
	g, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
	if _, err := rawPread(g, got, 0); err == nil {
		t.Error("rawPread on a closed file: no error")
	}
	if _, err := rawPwrite(g, got, 0); err == nil {
		t.Error("rawPwrite on a closed file: no error")
	}
	// A read-only descriptor: the kernel's EBADF comes back as the Errno.
	r, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := rawPwrite(r, got, 0); !errors.Is(err, syscall.EBADF) {
		t.Errorf("rawPwrite on a read-only file: %v, want EBADF", err)
	}
}

// The first commit's fsync time is the mean, not an eighth of it: a disk
// whose first fsync is slow is not taken for a quick one (the raw calls
// stay off), and before any commit there is no mean and no raw call.
func TestFsyncMeanStartsAtFirstCommit(t *testing.T) {
	const slow = 3 * rawSyncBelow
	q, _ := open(t, t.TempDir(), Options{Sync: func(f *os.File) error {
		time.Sleep(slow)
		return f.Sync()
	}})
	q.mu.Lock()
	raw := q.rawIO()
	q.mu.Unlock()
	if raw {
		t.Fatal("raw system calls before any commit, with no fsync time measured")
	}
	if err := q.Accept(context.Background(), msg("d", 0)); err != nil {
		t.Fatal(err)
	}
	q.mu.Lock()
	mean, raw := q.fsyncEWMA, q.rawIO()
	q.mu.Unlock()
	if mean < slow || raw {
		t.Errorf("after one fsync of at least %v: mean %v, raw %v; want the mean ≥ %v and no raw calls", slow, mean, raw, slow)
	}
}

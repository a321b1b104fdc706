package queue

import (
	"errors"
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
		"first commit (no mean)":   {4, 0, true},
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

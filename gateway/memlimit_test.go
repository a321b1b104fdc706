package gateway

import (
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestApplyMemoryLimit(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	before := debug.SetMemoryLimit(-1) // negative: read only
	tests := map[string]struct {
		limit int64
		env   string
		want  int64
	}{
		"config value":    {limit: 192 << 20, want: 192 << 20},
		"no limit":        {limit: -1, want: math.MaxInt64},
		"GOMEMLIMIT wins": {limit: 64 << 20, env: "300MiB", want: before},
		"large config":    {limit: 1 << 30, want: 1 << 30},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			restore := applyMemoryLimit(tc.limit, tc.env, log)
			got := debug.SetMemoryLimit(-1)
			restore()
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("limit while applied (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(before, debug.SetMemoryLimit(-1)); diff != "" {
				t.Errorf("limit after restore (-want +got):\n%s", diff)
			}
		})
	}
}

// The gateway applies memory_limit from its file for as long as it runs.
func TestGatewayAppliesMemoryLimit(t *testing.T) {
	if env := os.Getenv("GOMEMLIMIT"); env != "" {
		t.Skipf("GOMEMLIMIT=%s is set and wins over memory_limit", env)
	}
	before := debug.SetMemoryLimit(-1)
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	c := testConfig(dir)
	c.MemoryLimit = 100 << 20
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), c); err != nil {
		t.Fatal(err)
	}
	r := start(t, dir, nil)
	running := debug.SetMemoryLimit(-1)
	r.stop(t)
	if diff := cmp.Diff(int64(100<<20), running); diff != "" {
		t.Errorf("memory limit while running (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(before, debug.SetMemoryLimit(-1)); diff != "" {
		t.Errorf("memory limit after stop (-want +got):\n%s", diff)
	}
}

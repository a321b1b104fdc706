package gateway

import (
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestApplyMemoryLimit(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	// The test binary runs with no limit and GOGC=100 unless the
	// environment says otherwise; the cases below assume exactly that.
	if os.Getenv("GOMEMLIMIT") != "" || os.Getenv("GOGC") != "" {
		t.Skip("GOMEMLIMIT or GOGC is set in the environment; the cases assume neither")
	}
	before := debug.SetMemoryLimit(-1) // negative: read only
	beforePercent := gcPercent()
	type state struct {
		Limit   int64
		Percent int
	}
	tests := map[string]struct {
		limit          int64
		envLimit, gogc string
		want           state
	}{
		"config value":         {limit: 192 << 20, want: state{192 << 20, gcPercentUnderLimit}},
		"no limit":             {limit: -1, want: state{math.MaxInt64, 100}},
		"GOMEMLIMIT wins":      {limit: 64 << 20, envLimit: "300MiB", want: state{before, 100}},
		"large config":         {limit: 1 << 30, want: state{1 << 30, gcPercentUnderLimit}},
		"GOGC wins":            {limit: 192 << 20, gogc: "100", want: state{192 << 20, 100}},
		"GOGC with GOMEMLIMIT": {limit: 192 << 20, envLimit: "300MiB", gogc: "50", want: state{before, 100}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			restore := applyMemoryLimit(tc.limit, tc.envLimit, tc.gogc, log)
			got := state{debug.SetMemoryLimit(-1), gcPercent()}
			restore()
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("while applied (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(state{before, beforePercent}, state{debug.SetMemoryLimit(-1), gcPercent()}); diff != "" {
				t.Errorf("after restore (-want +got):\n%s", diff)
			}
		})
	}
}

// gcPercent reads the collector's percentage (SetGCPercent has no read-only
// form).
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
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

// With GOMEMLIMIT set by the operator the limit is the runtime's (not
// memory_limit) and the collector still runs at gcPercentUnderLimit under
// it. The runtime reads GOMEMLIMIT only at start, so the case runs in a
// child process of this test binary started with the variable set.
func TestApplyMemoryLimitUnderGOMEMLIMIT(t *testing.T) {
	const envLimit, limit = "300MiB", 300 << 20
	if os.Getenv("BASTION_MEMLIMIT_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestApplyMemoryLimitUnderGOMEMLIMIT$", "-test.v", "-test.count=1")
		cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
			return strings.HasPrefix(kv, "GOGC=") || strings.HasPrefix(kv, "GOMEMLIMIT=")
		}), "BASTION_MEMLIMIT_CHILD=1", "GOMEMLIMIT="+envLimit)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestApplyMemoryLimitUnderGOMEMLIMIT") {
			t.Fatalf("child with GOMEMLIMIT=%s: %v\n%s", envLimit, err, out)
		}
		return
	}
	if got := debug.SetMemoryLimit(-1); got != limit {
		t.Fatalf("child: runtime limit %d, want GOMEMLIMIT's %d", got, limit)
	}
	restore := applyMemoryLimit(64<<20, os.Getenv("GOMEMLIMIT"), "", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if diff := cmp.Diff([2]int64{limit, gcPercentUnderLimit}, [2]int64{debug.SetMemoryLimit(-1), int64(gcPercent())}); diff != "" {
		t.Errorf("while applied, [limit, GOGC] (-want +got):\n%s", diff)
	}
	restore()
	if diff := cmp.Diff([2]int64{limit, 100}, [2]int64{debug.SetMemoryLimit(-1), int64(gcPercent())}); diff != "" {
		t.Errorf("after restore, [limit, GOGC] (-want +got):\n%s", diff)
	}
}

// Package testenv decides whether a test that needs something from the
// machine (root, a network namespace, a Debian package) may run. Outside CI a
// missing requirement skips the test with a printed reason; when the test
// command sets BASTION_REQUIRE_ALL=1 (as scripts/test does) a missing
// requirement fails the test instead, so CI never skips silently.
package testenv

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Strict reports whether missing requirements must fail tests.
func Strict() bool { return os.Getenv("BASTION_REQUIRE_ALL") == "1" }

func missing(t testing.TB, reason string) {
	t.Helper()
	if Strict() {
		t.Fatalf("requirement missing and BASTION_REQUIRE_ALL=1: %s", reason)
	}
	t.Skipf("skipping: %s (run ./scripts/test to provide it)", reason)
}

// RequireRoot skips (or fails under the test command) unless running as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "test needs root (network namespaces, iptables)")
	}
}

// RequireCommand returns the path of name, or skips/fails if it is absent.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, "test needs the command "+name+" (see scripts/packages.d)")
	}
	return p
}

// FreePort asks the kernel for a free loopback port for network ("tcp" or
// "udp"), for a peer that must be told its port before it starts (or a
// restarted process that must come back on the same port).
func FreePort(tb testing.TB, network string) int {
	tb.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			tb.Fatalf("find a free udp port: %v", err)
		}
		defer c.Close()
		return c.LocalAddr().(*net.UDPAddr).Port
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("find a free tcp port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// ProcCPU is the user + system CPU time process pid has used, from
// /proc/pid/stat (clock ticks of 10 ms), or 0 if it cannot be read.
// Benchmarks report a server's CPU per operation with it: unlike a rate,
// it hardly depends on what else the machine is doing.
func ProcCPU(pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	f := strings.Fields(string(raw[bytes.LastIndexByte(raw, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// TCPCounter sums the named counters of the Tcp: lines of /proc/net/snmp
// (this network namespace's, e.g. "InSegs", "OutSegs"), or returns -1 if
// they cannot be read. On loopback every segment one side sends the other
// receives, and each is a pass through both TCP stacks: a sender whose
// writes find the receiver's window open sends each write as its own
// segment, one that finds it full coalesces them.
func TCPCounter(names ...string) int64 {
	raw, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return -1
	}
	var head []string
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		var n int64
		for i := 1; i < len(f) && i < len(head); i++ {
			if slices.Contains(names, head[i]) {
				v, _ := strconv.ParseInt(f[i], 10, 64)
				n += v
			}
		}
		return n
	}
	return -1
}

// SchedStat sums /proc/PID/task/*/schedstat over pid's threads: the CPU
// time they ran (ns) and how many times they were scheduled in (each wake
// after a sleep counts: a broker that keeps up with a publisher sleeps and
// is woken between packets, one that lags finds the next ones waiting).
func SchedStat(pid int) (ns, slices int64) {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	for _, t := range tasks {
		raw, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		if f := strings.Fields(string(raw)); len(f) > 2 {
			v, _ := strconv.ParseInt(f[0], 10, 64)
			n, _ := strconv.ParseInt(f[2], 10, 64)
			ns += v
			slices += n
		}
	}
	return ns, slices
}

// Package child makes the long-lived processes a test starts (a broker, a
// re-executed bastiond, qemu) end with the test binary. When a test binary
// dies without running its cleanups (a -timeout panic, SIGKILL, a crash),
// a child it started would otherwise run on as an orphan, holding its
// ports, files and network namespace. It never starts or waits for a
// process itself, except in CheckEndsWithParent, the check of that.
package child

import (
	"bufio"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// DieWithTest sets cmd to get SIGKILL when the test binary ends (Linux's
// parent-death signal), keeping any other SysProcAttr setting, and returns
// cmd. Call it before cmd.Start.
//
// The signal follows the thread that started the child, not the process:
// start it from an ordinary goroutine, never from one locked to its thread
// that may end locked (a failed switch back in netns.Do), or the child dies
// with that thread. Go ends no other thread while the process runs. The
// setting survives exec, also through `ip netns exec`, but is cleared when
// the child changes its user or group (setpriv --reuid: give setpriv
// --pdeathsig KILL) or runs a set-user-ID or file-capability binary.
func DieWithTest(cmd *exec.Cmd) *exec.Cmd {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	return cmd
}

// CheckEndsWithParent starts parent (which prints the pid of a
// long-lived child it started on its first line of output and then waits),
// kills it with SIGKILL and fails t unless that child ends within 10 s.
// A child left running is killed before t ends.
func CheckEndsWithParent(t testing.TB, parent func() *exec.Cmd) {
	t.Helper()
	cmd := parent()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("parent printed no child pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("parent printed %q, want the child's pid", line)
	}
	// The child is alive (its parent waits), so the pidfd names it and no
	// later process that reuses the number.
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("pidfd_open %d: %v", pid, err)
	}
	defer unix.Close(fd)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	// A pidfd polls readable once its process has exited.
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for range 100 { // EINTR retries, bounded
		n, err := unix.Poll(fds, 10_000)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			t.Fatalf("poll pidfd: %v", err)
		}
		if n == 0 {
			unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			t.Fatalf("child %d still running 10 s after its parent was killed", pid)
		}
		return
	}
	t.Fatal("poll pidfd: interrupted 100 times")
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build linux && !386

package udp

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestBastionHelloVerifyAnswerNeverWaits (Bastion patch (51)): the read
// loop's answer to a datagram from an unverified address is dropped when
// the socket has no room for it, and the read loop goes on reading. A
// spoofed sender whose answers cannot leave (a slow or stalled link, a full
// socket buffer) must not be able to stop the listener from reading what
// real devices send.
//
// Loopback hands a datagram to its receiver at once, so it never fills a
// sender's socket buffer. The test makes two network namespaces joined by a
// veth pair whose listener end holds its egress in a token bucket of one
// byte a second (tc tbf): every datagram the listener sends stays charged to
// its socket (SO_SNDBUF at the kernel's minimum), which is full after a few
// answers. A listener that waited for room would stop reading there; this
// one must read every datagram the peer sends, one at a time, and the
// socket must be full at the end (else the test proved nothing).
func TestBastionHelloVerifyAnswerNeverWaits(t *testing.T) {
	if os.Geteuid() != 0 {
		requirement(t, "needs root to make network namespaces and a qdisc")
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			requirement(t, tool+" (Debian iproute2) is not installed")
		}
	}
	nsA := fmt.Sprintf("bastion-hv-a-%d", os.Getpid())
	nsB := fmt.Sprintf("bastion-hv-b-%d", os.Getpid())
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil { //nolint:gosec // fixed test commands
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", nsA)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", nsA).Run() })
	run("ip", "netns", "add", nsB)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", nsB).Run() })
	run("ip", "link", "add", "hva", "address", "02:00:00:00:51:01", "netns", nsA,
		"type", "veth", "peer", "name", "hvb", "address", "02:00:00:00:51:02", "netns", nsB)
	run("ip", "-n", nsA, "addr", "add", "10.251.0.1/30", "dev", "hva")
	run("ip", "-n", nsB, "addr", "add", "10.251.0.2/30", "dev", "hvb")
	run("ip", "-n", nsA, "link", "set", "hva", "up")
	run("ip", "-n", nsB, "link", "set", "hvb", "up")
	// Static neighbours: no ARP exchange to pass through the stalled qdisc.
	run("ip", "-n", nsA, "neigh", "add", "10.251.0.2", "lladdr", "02:00:00:00:51:02", "dev", "hva", "nud", "permanent")
	run("ip", "-n", nsB, "neigh", "add", "10.251.0.1", "lladdr", "02:00:00:00:51:01", "dev", "hvb", "nud", "permanent")
	// A datagram from the listener drains every minute or two: nothing the
	// listener sends after the first couple leaves during the test.
	run("ip", "netns", "exec", nsA, "tc", "qdisc", "add", "dev", "hva", "root", "tbf",
		"rate", "8bit", "burst", "225", "limit", "1000000")

	var offered atomic.Int64
	lc := ListenConfig{
		HelloVerify: func(_ []byte, _ netip.AddrPort, reply []byte) (int, bool, uint64) {
			offered.Add(1)
			// A HelloVerifyRequest is 48 bytes.
			for i := range 48 {
				reply[i] = byte(i)
			}

			return 48, false, 0
		},
		ListenConfig: net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				// The kernel raises it to its minimum (about 4.5 KiB).
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 1)
			})
			if err != nil {
				return err
			}

			return serr
		}},
	}
	var ln *listener
	var peer net.PacketConn
	inNetns(t, nsA, func() error {
		l, err := lc.Listen("udp4", &net.UDPAddr{IP: net.IPv4(10, 251, 0, 1)})
		if err != nil {
			return err
		}
		ln = l.(*listener) //nolint:forcetypeassert

		return nil
	})
	t.Cleanup(func() { _ = ln.Close() })
	inNetns(t, nsB, func() error {
		var err error
		peer, err = net.ListenPacket("udp4", "10.251.0.2:0")

		return err
	})
	t.Cleanup(func() { _ = peer.Close() })

	// Each datagram is sent after the last was read, so the listener's
	// receive buffer never drops one and every one must be offered.
	const sends = 200
	for i := range sends {
		if _, err := peer.WriteTo([]byte(fmt.Sprint("client hello ", i)), ln.pConn.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for offered.Load() < int64(i+1) {
			if time.Now().After(deadline) {
				t.Fatalf("the listener read %d of %d datagrams and stopped: its read loop waits for room to answer an unverified sender", offered.Load(), i+1)
			}
			time.Sleep(time.Millisecond)
		}
	}

	// The socket had no room: a write that waits times out. Without this
	// the stall did not happen and the loop above proved nothing.
	if err := ln.pConn.SetWriteDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, err := ln.pConn.WriteToUDPAddrPort([]byte("room?"), peer.LocalAddr().(*net.UDPAddr).AddrPort()) //nolint:forcetypeassert
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a waiting write on the listener's socket after %d answers: %v, want a timeout (the socket was never full: the qdisc did not hold the answers)", sends, err)
	}
}

// requirement skips t with reason, or fails it when the test command asks
// that nothing be skipped (scripts/test as root sets BASTION_REQUIRE_ALL=1).
func requirement(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("BASTION_REQUIRE_ALL") == "1" {
		t.Fatalf("requirement missing and BASTION_REQUIRE_ALL=1: %s", reason)
	}
	t.Skipf("skipped: %s", reason)
}

// inNetns runs f on a thread inside the named network namespace (made by
// ip netns add), so that the sockets f makes belong to it; the thread goes
// back to the test's namespace after, or is not reused if it cannot.
func inNetns(t *testing.T, name string, f func() error) {
	t.Helper()
	var ferr, err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		self, oerr := os.Open("/proc/thread-self/ns/net")
		if oerr != nil {
			err = oerr

			return
		}
		defer self.Close() //nolint:errcheck
		target, oerr := os.Open("/run/netns/" + name)
		if oerr != nil {
			err = oerr

			return
		}
		defer target.Close() //nolint:errcheck
		if err = setns(target); err != nil {
			return
		}
		ferr = f()
		if err = setns(self); err == nil {
			runtime.UnlockOSThread()
		}
		// Still locked on error: the thread ends with this goroutine.
	}()
	<-done
	if err != nil {
		t.Fatalf("network namespace %s: %v", name, err)
	}
	if ferr != nil {
		t.Fatalf("in network namespace %s: %v", name, ferr)
	}
}

// setnsCall is setns(2)'s number, which package syscall does not name.
var setnsCall = map[string]uintptr{"amd64": 308, "arm64": 268, "riscv64": 268, "loong64": 268, "arm": 375}

func setns(f *os.File) error {
	nr, ok := setnsCall[runtime.GOARCH]
	if !ok {
		return fmt.Errorf("setns(2) has no known number on %s", runtime.GOARCH) //nolint:err113
	}
	if _, _, e := syscall.RawSyscall(nr, f.Fd(), syscall.CLONE_NEWNET, 0); e != 0 {
		return os.NewSyscallError("setns", e)
	}

	return nil
}

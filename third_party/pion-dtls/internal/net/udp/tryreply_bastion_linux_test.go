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
	}
	ln, peer := stalledListener(t, "hv", lc)

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

// TestBastionSessionWriteNeverWaits (Bastion patch (52)): no write on the
// listener's socket waits for room, a session's (PacketConn.WriteTo's
// path, writeTo) no more than the read loop's answers. A session write
// that waited held the socket's write lock, and every other writer, the
// read loop at its next HelloVerifyRequest included, waited behind it for
// as long as the socket stayed full, which anyone on the LAN can arrange
// (ClientHellos from made-up addresses whose answers wait for neighbour
// resolution). Here the socket is filled as in
// TestBastionHelloVerifyAnswerNeverWaits; each session write must return
// at once, report the datagram sent, and a datagram that did not fit must
// be reported to WriteDropped; then, with a writer still writing, the read
// loop must read (and answer) every datagram the peer sends.
func TestBastionSessionWriteNeverWaits(t *testing.T) {
	var offered, dropped, droppedBytes atomic.Int64
	var droppedTo atomic.Value // netip.AddrPort
	lc := ListenConfig{
		HelloVerify: func(_ []byte, _ netip.AddrPort, reply []byte) (int, bool, uint64) {
			offered.Add(1)

			return copy(reply, make([]byte, 48)), false, 0
		},
		WriteDropped: func(to netip.AddrPort, size int) {
			droppedTo.Store(to)
			dropped.Add(1)
			droppedBytes.Add(int64(size))
		},
	}
	ln, peer := stalledListener(t, "sw", lc)
	to := peer.LocalAddr().(*net.UDPAddr).AddrPort() //nolint:forcetypeassert
	toAddr := net.UDPAddrFromAddrPort(to)
	// An answer's DTLS record, small enough for the token bucket's burst
	// (tbf drops a larger packet at once instead of holding it).
	record := make([]byte, 100)
	// write is one session write, which must return within a second (a
	// write that waits for room waits here until the qdisc lets a
	// datagram go, a minute or two).
	write := func(what string) {
		t.Helper()
		type result struct {
			n   int
			err error
		}
		done := make(chan result, 1)
		go func() {
			n, err := ln.io.writeTo(record, toAddr, to)
			done <- result{n, err}
		}()
		select {
		case r := <-done:
			if r.err != nil || r.n != len(record) {
				t.Fatalf("%s: writeTo = %d, %v; want %d, nil (a dropped datagram is reported sent)", what, r.n, r.err, len(record))
			}
		case <-time.After(time.Second):
			t.Fatalf("%s: a session's write on the listener's socket waited for room (more than 1 s)", what)
		}
	}
	for i := 0; dropped.Load() == 0; i++ {
		if i == 1000 {
			t.Fatal("1000 writes and none dropped: the socket never filled (the qdisc did not hold the datagrams)")
		}
		write(fmt.Sprint("write ", i))
	}
	if got, _ := droppedTo.Load().(netip.AddrPort); got != to || droppedBytes.Load() != int64(len(record))*dropped.Load() {
		t.Errorf("WriteDropped told of %d datagrams, %d bytes, to %v; want %d-byte datagrams to %v", dropped.Load(), droppedBytes.Load(), got, len(record), to)
	}
	write("a write to the full socket")

	// A session keeps writing to the full socket while the peer sends:
	// the read loop reads and answers every datagram.
	stop := make(chan struct{})
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_, _ = ln.io.writeTo(record, toAddr, to)
			time.Sleep(100 * time.Microsecond)
		}
	}()
	t.Cleanup(func() { close(stop); <-writerDone })
	before := dropped.Load()
	const sends = 100
	for i := range sends {
		if _, err := peer.WriteTo([]byte(fmt.Sprint("client hello ", i)), ln.pConn.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for offered.Load() < int64(i+1) {
			if time.Now().After(deadline) {
				t.Fatalf("the listener read %d of %d datagrams and stopped while a session wrote to its full socket", offered.Load(), i+1)
			}
			time.Sleep(time.Millisecond)
		}
	}
	write("a write after the read loop's answers")
	if dropped.Load() < before+sends {
		t.Errorf("%d datagrams dropped while the read loop answered %d datagrams and a session wrote, want at least %d more than the %d before", dropped.Load(), sends, sends, before)
	}
}

// stalledListener makes two network namespaces joined by a veth pair
// (names from tag) whose listener end holds its egress in a token bucket
// of one byte a second (tc tbf), and a listener of lc there, with its
// socket's send buffer at the kernel's minimum, and a peer socket in the
// other namespace. Loopback hands a datagram to its receiver at once, so
// it never fills a sender's socket buffer; here every datagram the
// listener sends stays charged to its socket, which is full after a few.
// It skips (or, with BASTION_REQUIRE_ALL=1, fails) unless run as root
// with ip and tc.
func stalledListener(t *testing.T, tag string, lc ListenConfig) (*listener, net.PacketConn) {
	t.Helper()
	needNetns(t, "network namespaces and a qdisc", "ip", "tc")
	nsA := addNetns(t, tag+"-a")
	nsB := addNetns(t, tag+"-b")
	runCmd(t, "ip", "link", "add", tag+"a", "address", "02:00:00:00:51:01", "netns", nsA,
		"type", "veth", "peer", "name", tag+"b", "address", "02:00:00:00:51:02", "netns", nsB)
	runCmd(t, "ip", "-n", nsA, "addr", "add", "10.251.0.1/30", "dev", tag+"a")
	runCmd(t, "ip", "-n", nsB, "addr", "add", "10.251.0.2/30", "dev", tag+"b")
	runCmd(t, "ip", "-n", nsA, "link", "set", tag+"a", "up")
	runCmd(t, "ip", "-n", nsB, "link", "set", tag+"b", "up")
	// Static neighbours: no ARP exchange to pass through the stalled qdisc.
	runCmd(t, "ip", "-n", nsA, "neigh", "add", "10.251.0.2", "lladdr", "02:00:00:00:51:02", "dev", tag+"a", "nud", "permanent")
	runCmd(t, "ip", "-n", nsB, "neigh", "add", "10.251.0.1", "lladdr", "02:00:00:00:51:01", "dev", tag+"b", "nud", "permanent")
	// A datagram from the listener drains every minute or two: nothing the
	// listener sends after the first couple leaves during the test.
	runCmd(t, "ip", "netns", "exec", nsA, "tc", "qdisc", "add", "dev", tag+"a", "root", "tbf",
		"rate", "8bit", "burst", "225", "limit", "1000000")

	lc.ListenConfig = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			// The kernel raises it to its minimum (about 4.5 KiB).
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 1)
		})
		if err != nil {
			return err
		}

		return serr
	}}
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

	return ln, peer
}

// needNetns skips t (see requirement) unless it runs as root with tools,
// which it needs to make what (network namespaces, ...).
func needNetns(t *testing.T, what string, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		requirement(t, "needs root to make "+what)
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			requirement(t, tool+" (Debian iproute2) is not installed")
		}
	}
}

// addNetns makes a network namespace named from tag (and the test
// process), deleted, with everything in it, when t ends.
func addNetns(t *testing.T, tag string) string {
	t.Helper()
	name := fmt.Sprintf("bastion-%s-%d", tag, os.Getpid())
	runCmd(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })

	return name
}

// runCmd runs a set-up command and fails t if it fails.
func runCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil { //nolint:gosec // fixed test commands
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
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

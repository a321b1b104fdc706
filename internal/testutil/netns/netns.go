// Package netns gives tests throw-away Linux network namespaces joined by
// veth pairs, with listeners and probes that run inside them. Every
// namespace, link and goroutine it creates is removed when the test ends.
// It never touches the host's own namespace beyond creating and deleting
// the named namespaces it made. Callers must check testenv.RequireRoot and
// testenv.RequireCommand(t, "ip") first.
package netns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/netns"
)

// NS is a named network namespace owned by one test.
type NS struct {
	Name string
	t    testing.TB
}

// New creates a namespace named bst-<prefix>-<random> with loopback up and
// deletes it at the end of the test.
func New(t testing.TB, prefix string) *NS {
	t.Helper()
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("bst-%s-%s", prefix, hex.EncodeToString(b[:]))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	n := &NS{Name: name, t: t}
	n.MustRun("ip", "link", "set", "lo", "up")
	// No duplicate address detection on links the test made: addresses,
	// link-local ones included, are usable at once instead of after a
	// second or two of "tentative" (which makes first probes flaky).
	n.MustRun("sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")
	return n
}

// Run runs a command inside the namespace (via `ip netns exec`) and returns
// its combined output.
func (n *NS) Run(args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("in netns %s: %s: %w: %s", n.Name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(args ...string) string {
	n.t.Helper()
	out, err := n.Run(args...)
	if err != nil {
		n.t.Fatal(err)
	}
	return out
}

// Do runs fn with the calling thread inside the namespace; sockets fn opens
// stay in the namespace.
func (n *NS) Do(fn func() error) error { return netns.Do(n.Name, fn) }

// Veth joins a and b with a veth pair named aIf (in a) and bIf (in b), both up.
func Veth(t testing.TB, a *NS, aIf string, b *NS, bIf string) {
	t.Helper()
	out, err := exec.Command("ip", "link", "add", aIf, "netns", a.Name, "type", "veth",
		"peer", "name", bIf, "netns", b.Name).CombinedOutput()
	if err != nil {
		t.Fatalf("ip link add veth %s/%s <-> %s/%s: %v: %s", a.Name, aIf, b.Name, bIf, err, out)
	}
	a.MustRun("ip", "link", "set", aIf, "up")
	b.MustRun("ip", "link", "set", bIf, "up")
}

// AddAddr assigns cidr to ifname. IPv6 addresses get nodad so they are
// usable at once instead of after duplicate address detection.
func (n *NS) AddAddr(ifname, cidr string) {
	n.t.Helper()
	args := []string{"ip", "addr", "add", cidr, "dev", ifname}
	if strings.Contains(cidr, ":") {
		args = append(args, "nodad")
	}
	n.MustRun(args...)
}

// ServeTCP listens on addr ("[::]:8883" or ":8883", dual-stack) inside the
// namespace and accepts and closes every connection until the test ends.
func (n *NS) ServeTCP(addr string) { n.serveTCP(addr, false) }

// EchoTCP is ServeTCP with connections kept open, echoing what they read.
func (n *NS) EchoTCP(addr string) { n.serveTCP(addr, true) }

func (n *NS) serveTCP(addr string, echo bool) {
	n.t.Helper()
	var ln net.Listener
	err := n.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		n.t.Fatalf("listen tcp %s in %s: %v", addr, n.Name, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !echo {
				c.Close()
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	// Echoing connections end when their clients close them (the tests'
	// own cleanups, which run first).
	n.t.Cleanup(func() { ln.Close(); wg.Wait() })
}

// ServeUDP listens on addr inside the namespace and echoes every datagram
// back to its sender until the test ends.
func (n *NS) ServeUDP(addr string) {
	n.t.Helper()
	var pc net.PacketConn
	err := n.Do(func() error {
		var err error
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	if err != nil {
		n.t.Fatalf("listen udp %s in %s: %v", addr, n.Name, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:k], from)
		}
	}()
	n.t.Cleanup(func() { pc.Close(); wg.Wait() })
}

// Answers reports whether a listener at addr answers a probe sent from
// inside the namespace within timeout: for "tcp" the handshake completes,
// for "udp" the datagram is echoed. A silent drop, a reset or an ICMP
// error all count as not answering; only local failures are errors.
func (n *NS) Answers(ctx context.Context, network, addr string, timeout time.Duration) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var conn net.Conn
	var d net.Dialer
	// The dial runs inside Do because the socket must be created in the
	// namespace; for TCP that includes the (bounded) handshake.
	err := n.Do(func() error {
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		// A dial that ran out of time (on a loaded machine, even a UDP
		// dial's socket set-up can) may report it before ctx does.
		var ne net.Error
		if network == "tcp" || ctx.Err() != nil || errors.As(err, &ne) && ne.Timeout() {
			return false, nil // timed out, refused or unreachable: not answering
		}
		return false, fmt.Errorf("dial %s %s in %s: %w", network, addr, n.Name, err)
	}
	defer conn.Close()
	if network == "tcp" {
		return true, nil
	}
	dl, _ := ctx.Deadline()
	_ = conn.SetDeadline(dl)
	if _, err := conn.Write([]byte("probe")); err != nil {
		return false, nil
	}
	buf := make([]byte, 16)
	k, err := conn.Read(buf)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return false, nil
		}
		return false, nil // ICMP port unreachable surfaces as ECONNREFUSED
	}
	return string(buf[:k]) == "probe", nil
}

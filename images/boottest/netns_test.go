package boottest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/bastion-iot/bastion/internal/testenv"
)

// netns is a network namespace the test made for qemu. It has only a
// loopback interface, so the guest behind qemu's user-mode network can reach
// nothing beyond the forwards on that loopback. (qemu's restrict=on would do
// the isolation too, but it also drops the guest's UDP answers to host
// forwards, which CoAPS needs.)
type netns struct {
	name string
	f    *os.File
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	ip := testenv.RequireCommand(t, "ip")
	b := make([]byte, 4)
	rand.Read(b)
	name := "bastion-boot-" + hex.EncodeToString(b)
	if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(ip, "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command(ip, "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	// The guest's own address, on the namespace's loopback too, so that a
	// client there can dial the gateway by the name its certificate has.
	if out, err := exec.Command(ip, "-n", name, "addr", "add", guestIP+"/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s addr add %s: %v: %s", name, guestIP, err, out)
	}
	// ...but connections to it leave from 127.0.0.1: qemu's user network
	// shows a loopback peer to the guest as its gateway (10.0.2.2), while a
	// peer at 10.0.2.15 would look like the guest itself and never connect.
	if out, err := exec.Command(ip, "-n", name, "route", "replace", "local", guestIP, "dev", "lo",
		"table", "local", "proto", "kernel", "scope", "host", "src", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s route replace local %s: %v: %s", name, guestIP, err, out)
	}
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &netns{name: name, f: f}
}

// do runs fn on an OS thread switched into the namespace, so the sockets fn
// creates live there; they keep working from any goroutine afterwards.
func (n *netns) do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := unix.Setns(int(n.f.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", n.name, err)
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: Go discards it when this goroutine ends
		// rather than reuse a thread in the wrong namespace.
		return fmt.Errorf("setns back from %s: %w", n.name, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// freePort returns a port on 127.0.0.1 (and so on every address) inside the namespace that was free a
// moment ago.
func (n *netns) freePort(proto string) (int, error) {
	var port int
	err := n.do(func() error {
		switch proto {
		case "tcp":
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return err
			}
			defer l.Close()
			port = l.Addr().(*net.TCPAddr).Port
		case "udp":
			c, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				return err
			}
			defer c.Close()
			port = c.LocalAddr().(*net.UDPAddr).Port
		default:
			return fmt.Errorf("freePort: unknown protocol %q", proto)
		}
		return nil
	})
	return port, err
}

// dial connects from inside the namespace.
func (n *netns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// listenUDP opens a UDP socket on the namespace's loopback.
func (n *netns) listenUDP() (net.PacketConn, error) {
	var c net.PacketConn
	err := n.do(func() error {
		var err error
		c, err = net.ListenPacket("udp", "127.0.0.1:0")
		return err
	})
	return c, err
}

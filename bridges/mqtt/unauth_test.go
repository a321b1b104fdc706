package mqtt

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// unauthFrom reports the listener's unauthenticated connections from host.
func (r *rig) unauthFrom(host string) int {
	return r.s.tls.limit.From(netip.MustParseAddr(host))
}

// closedAtOnce dials the server from the address from and fails unless the
// server closes the connection without a word (well within the 10 s
// handshake timeout an admitted one would get).
func closedAtOnce(t *testing.T, r *rig, from string) {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", r.addrFrom(from))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 1))
	var ne net.Error
	switch {
	case err == nil:
		t.Fatalf("connection from %s over the limit: the server sent %d bytes", from, n)
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("connection from %s over the limit is still open after 3 s", from)
	}
}

// TestUnauthenticatedConnectionsLimitedPerSource: connections that have
// not authenticated (here: TCP, then nothing, as a slowloris sends) are
// held to MaxUnauthPerSource per source address; one more from that
// address is closed at once and counted as handshake_limit, while another
// address and authenticated sessions are not affected.
func TestUnauthenticatedConnectionsLimitedPerSource(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{}, nil)
	var idle []net.Conn
	for range 16 {
		c, err := net.Dial("tcp", r.s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		idle = append(idle, c)
	}
	for deadline := time.Now().Add(5 * time.Second); r.unauthFrom("127.0.0.1") < 16; {
		if time.Now().After(deadline) {
			t.Fatalf("unauthenticated connections from 127.0.0.1 = %d, want 16", r.unauthFrom("127.0.0.1"))
		}
		time.Sleep(5 * time.Millisecond)
	}

	// The 17th is closed before its TLS handshake.
	closedAtOnce(t, r, "127.0.0.1")
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v, want 1", got)
	}

	// Another source address is its own.
	r.from = "127.0.0.2"
	r.dial(t, "dev-b", 5)
	r.from = ""

	// Once the idle ones go, authenticated sessions from 127.0.0.1 hold
	// no slot: more than 16 connect and stay connected.
	for _, c := range idle {
		c.Close()
	}
	for deadline := time.Now().Add(5 * time.Second); r.unauthFrom("127.0.0.1") > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("slots from 127.0.0.1 still taken after its connections closed: %d", r.unauthFrom("127.0.0.1"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := range 20 {
		r.dial(t, "dev-a"+string(rune('a'+i)), 5)
	}
	if n := r.unauthFrom("127.0.0.1"); n != 0 {
		t.Errorf("authenticated sessions hold %d slots, want 0", n)
	}
}

// TestUnauthenticatedConnectionsLimitedInAll: past MaxUnauth in all, the
// oldest unauthenticated connection is closed, not the new one: idle
// connections from many addresses cannot keep a device out.
func TestUnauthenticatedConnectionsLimitedInAll(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{MaxUnauth: 3}, nil)
	var idle []net.Conn
	for i := range 3 {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(10+i))}}
		c, err := d.Dial("tcp", r.s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		idle = append(idle, c)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		n := r.s.tls.limit.Len()
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unauthenticated connections = %d, want 3", n)
		}
	}
	r.from = "127.0.0.20"
	r.dial(t, "dev-new", 5) // connects: the oldest idle connection made room
	idle[0].SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := idle[0].Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("the oldest idle connection was not closed: %v", err)
	}
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v, want 1", got)
	}
}

// TestCloseEndsUnauthenticatedConnections: shutting down does not wait for
// a connection that finished its TLS handshake but sent no CONNECT (not
// yet one of the broker's clients) to reach its 10 s CONNECT deadline.
func TestCloseEndsUnauthenticatedConnections(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{}, nil)
	d := r.dialTLS(t, "quiet", 5, true) // and no CONNECT
	time.Sleep(100 * time.Millisecond)  // the server is waiting for it
	closed := make(chan struct{})
	go func() { r.s.tls.Close(func(string) {}); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("the listener's Close waited for a connection that sent no CONNECT")
	}
	d.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := d.c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("the connection without CONNECT is still open after Close: %v", err)
	}
}

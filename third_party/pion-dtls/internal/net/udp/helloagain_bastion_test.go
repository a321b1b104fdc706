// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// helloAgainFake is conn's Replacer: a datagram starting with 'H' is a
// new handshake; it counts its ends, and closes conn, as a DTLS
// connection's does.
type helloAgainFake struct {
	conn  *PacketConn
	ended atomic.Int32
}

func (f *helloAgainFake) NewHello(b []byte) bool { return len(b) > 0 && b[0] == 'H' }

func (f *helloAgainFake) EndForHello() {
	f.ended.Add(1)
	_ = f.conn.Close()
}

// helloAgainRead reads the next datagram of c (10 s at most).
func helloAgainRead(t *testing.T, c net.PacketConn, want string) {
	t.Helper()
	b := make([]byte, 64)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _, err := c.ReadFrom(b)
	if err != nil || string(b[:n]) != want {
		t.Fatalf("read %q, %v; want %q", b[:n], err, want)
	}
}

func helloAgainSend(t *testing.T, c *net.UDPConn, s string) {
	t.Helper()
	if _, err := c.Write([]byte(s)); err != nil {
		t.Fatal(err)
	}
}

// TestBastionHelloAgainAcceptQueue (patch (54)): a new handshake from the
// address of a connection with a Replacer, let through by HelloVerify,
// moves the address to a new connection and ends the old one; but not
// while the accept queue is full, when no new connection could be made:
// then the old connection keeps its address and is not ended (the client
// sends its ClientHello again). HelloVerify here lets through every
// datagram that starts with 'h' or 'H'.
func TestBastionHelloAgainAcceptQueue(t *testing.T) {
	lc := ListenConfig{
		Backlog: 1,
		HelloVerify: func(b []byte, _ netip.AddrPort, _ []byte) (int, bool, uint64) {
			return 0, len(b) > 0 && (b[0] == 'h' || b[0] == 'H'), 7
		},
	}
	ln, err := lc.Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	accept := func() net.PacketConn {
		t.Helper()
		type res struct {
			c   net.PacketConn
			err error
		}
		r := make(chan res, 1)
		go func() { c, _, err := ln.Accept(); r <- res{c, err} }()
		select {
		case got := <-r:
			if got.err != nil {
				t.Fatal(got.err)
			}
			t.Cleanup(func() { _ = got.c.Close() })
			return got.c
		case <-time.After(10 * time.Second):
			t.Fatal("no connection accepted")
			return nil
		}
	}

	a, b := dial(), dial()
	helloAgainSend(t, a, "h1")
	connA := accept()
	helloAgainRead(t, connA, "h1")
	fake := &helloAgainFake{conn: connA.(*PacketConn)} //nolint:forcetypeassert
	fake.conn.SetReplacer(fake)

	// b's connection fills the accept queue; a's next datagram is read
	// after it (one socket, in order).
	helloAgainSend(t, b, "h2")
	helloAgainSend(t, a, "d1")
	helloAgainRead(t, connA, "d1")
	helloAgainSend(t, a, "H-full")
	helloAgainSend(t, a, "d2")
	helloAgainRead(t, connA, "d2")
	if n := fake.ended.Load(); n != 0 {
		t.Fatalf("connection ended %d times for a new handshake that found the accept queue full", n)
	}

	// With room in the queue, the new handshake gets the address.
	connB := accept()
	helloAgainRead(t, connB, "h2")
	helloAgainSend(t, a, "H-room")
	connA2 := accept()
	if n := fake.ended.Load(); n != 1 {
		t.Fatalf("old connection ended %d times, want once", n)
	}
	if got, want := connA2.(*PacketConn).raddr.String(), a.LocalAddr().String(); got != want { //nolint:forcetypeassert
		t.Fatalf("new connection for %s, want %s", got, want)
	}
	if tag, ok := connA2.(*PacketConn).AcceptTag(); !ok || tag != 7 { //nolint:forcetypeassert
		t.Fatalf("new connection's tag %d, %v; want HelloVerify's 7", tag, ok)
	}
	helloAgainRead(t, connA2, "H-room")
	helloAgainSend(t, a, "d3")
	helloAgainRead(t, connA2, "d3")
	if _, _, err := connA.ReadFrom(make([]byte, 64)); err == nil {
		t.Fatal("the old connection reads on after its end")
	}
}

// TestBastionHelloAgainAcceptFilter (patch (54)): a new handshake that
// HelloVerify lets through but the listener's AcceptFilter refuses (a
// datagram whose other records do not parse) would make no connection, so
// the old connection keeps its address and is not ended. Here the filter
// refuses datagrams starting with "Hx".
func TestBastionHelloAgainAcceptFilter(t *testing.T) {
	lc := ListenConfig{
		Backlog: 4,
		HelloVerify: func(b []byte, _ netip.AddrPort, _ []byte) (int, bool, uint64) {
			return 0, len(b) > 0 && (b[0] == 'h' || b[0] == 'H'), 7
		},
		AcceptFilter: func(b []byte) bool { return len(b) < 2 || string(b[:2]) != "Hx" },
	}
	ln, err := lc.Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	a, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr)) //nolint:forcetypeassert
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	helloAgainSend(t, a, "h1")
	conn, _, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	helloAgainRead(t, conn, "h1")
	fake := &helloAgainFake{conn: conn.(*PacketConn)} //nolint:forcetypeassert
	fake.conn.SetReplacer(fake)
	helloAgainSend(t, a, "Hx-refused")
	helloAgainSend(t, a, "d1")
	helloAgainRead(t, conn, "d1")
	if n := fake.ended.Load(); n != 0 {
		t.Fatalf("connection ended %d times for a new handshake the accept filter refuses", n)
	}
}

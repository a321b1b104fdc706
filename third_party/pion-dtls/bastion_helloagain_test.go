// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (54) (third_party/README.md): a new handshake
// from the address of an established session, with
// Config.StatelessHelloVerify.

package dtls

import (
	"bytes"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// helloAgainWait bounds every wait of these tests.
const helloAgainWait = 10 * time.Second

// helloAgainListener is a stateless listener on loopback. Each connection
// it accepts runs its handshake; those that complete arrive on conns, in
// order; accepted counts the connections made. All are closed when the
// test ends.
func helloAgainListener(t *testing.T) (ln net.Listener, conns <-chan *Conn, accepted *atomic.Int32) {
	t.Helper()
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionStatelessConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var mu sync.Mutex
	var all []*Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range all {
			_ = c.Close()
		}
	})
	ch := make(chan *Conn, 8)
	accepted = new(atomic.Int32)
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c := nc.(*Conn) //nolint:forcetypeassert
			mu.Lock()
			all = append(all, c)
			mu.Unlock()
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), helloAgainWait)
				defer cancel()
				if c.HandshakeContext(ctx) == nil {
					ch <- c
				}
			}()
		}
	}()

	return ln, ch, accepted
}

// helloAgainClient does a client's handshake with cfg from tap, a socket
// bound to 127.0.0.1:port (0: any port).
func helloAgainClient(t *testing.T, raddr net.Addr, tap *tappedPacketConn, port int, cfg *Config) *Conn {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	tap.UDPConn = pc
	c, err := Client(tap, raddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), helloAgainWait)
	defer cancel()
	if err := c.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake from port %d: %v", port, err)
	}

	return c
}

func nextConn(t *testing.T, conns <-chan *Conn) *Conn {
	t.Helper()
	select {
	case c := <-conns:
		return c
	case <-time.After(helloAgainWait):
		t.Fatal("no server connection completed its handshake")

		return nil
	}
}

// bastionServed is what a server connection read: its data, and how its
// reading ended.
type bastionServed struct {
	data  chan []byte
	ended chan error
}

// bastionServe reads s with an inline read handler (as bridges/coap) or
// with Read on a goroutine.
func bastionServe(t *testing.T, s *Conn, inline bool) *bastionServed {
	t.Helper()
	sv := &bastionServed{data: make(chan []byte, 16), ended: make(chan error, 1)}
	take := func(p []byte, err error) bool {
		if err != nil {
			select {
			case sv.ended <- err:
			default:
			}

			return false
		}
		select {
		case sv.data <- bytes.Clone(p):
		default:
		}

		return true
	}
	if inline {
		if err := s.SetInlineReadHandler(func(p []byte, err error) { take(p, err) }); err != nil {
			t.Fatal(err)
		}

		return sv
	}
	go func() {
		b := make([]byte, 2048)
		for {
			n, err := s.Read(b)
			if !take(b[:n], err) {
				return
			}
		}
	}()

	return sv
}

// bastionRoundTrip sends msg from c to s and back.
func bastionRoundTrip(t *testing.T, c, s *Conn, sv *bastionServed, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("client write: %v", err)
	}
	select {
	case got := <-sv.data:
		if string(got) != msg {
			t.Fatalf("server read %q, want %q", got, msg)
		}
	case err := <-sv.ended:
		t.Fatalf("server connection ended (%v) before it read %q", err, msg)
	case <-time.After(helloAgainWait):
		t.Fatalf("server did not read %q", msg)
	}
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatalf("server write: %v", err)
	}
	b := make([]byte, 64)
	_ = c.SetReadDeadline(time.Now().Add(helloAgainWait))
	n, err := c.Read(b)
	if err != nil || string(b[:n]) != msg {
		t.Fatalf("client read %q, %v; want %q", b[:n], err, msg)
	}
}

// helloFragmented reports whether datagram b holds a ClientHello fragment
// past the first.
func helloFragmented(b []byte) bool {
	pkts, err := recordlayer.UnpackDatagram(b)
	if err != nil {
		return false
	}
	for _, p := range pkts {
		var h handshake.Header
		if protocol.ContentType(p[0]) == protocol.ContentTypeHandshake &&
			h.Unmarshal(p[recordlayer.FixedHeaderSize:]) == nil &&
			h.Type == handshake.TypeClientHello && h.FragmentOffset > 0 {
			return true
		}
	}

	return false
}

// A device that restarts and handshakes again from the address and port
// of its session gets a new session at once: its handshake completes
// (after a HelloVerifyRequest), the old server connection's reading ends
// (a read handler's io.EOF, Read's error) and data flows on the new one;
// also when the new ClientHello comes in fragments. Without patch (54) the
// new ClientHellos go to the old session, which drops them, and the
// handshake times out.
func TestBastionHelloAgainReplacesSession(t *testing.T) {
	for _, tc := range []struct {
		name   string
		inline bool
		mtu    int
	}{
		{"inline read handler", true, 0},
		{"Read", false, 0},
		{"fragmented ClientHello", true, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, conns, accepted := helloAgainListener(t)
			tap1 := &tappedPacketConn{}
			c1 := helloAgainClient(t, ln.Addr(), tap1, 0, bastionPSKConfig())
			s1 := nextConn(t, conns)
			sv1 := bastionServe(t, s1, tc.inline)
			bastionRoundTrip(t, c1, s1, sv1, "before")

			// The device restarts: its session is gone, without a
			// close_notify, and it starts again from the same port.
			port := tap1.LocalAddr().(*net.UDPAddr).Port //nolint:forcetypeassert
			_ = tap1.UDPConn.Close()
			cfg := bastionPSKConfig()
			cfg.MTU = tc.mtu
			var fragments atomic.Int32
			tap2 := &tappedPacketConn{wrote: func(b []byte) {
				if helloFragmented(b) {
					fragments.Add(1)
				}
			}}
			c2 := helloAgainClient(t, ln.Addr(), tap2, port, cfg)
			s2 := nextConn(t, conns)
			select {
			case err := <-sv1.ended:
				t.Logf("old session's reading ended: %v", err)
			case <-time.After(helloAgainWait):
				t.Fatal("the old server connection was not closed")
			}
			if !s1.isConnectionClosed() {
				t.Error("the old server connection's reading ended but it is not closed")
			}
			sv2 := bastionServe(t, s2, tc.inline)
			bastionRoundTrip(t, c2, s2, sv2, "after")
			if got := accepted.Load(); got != 2 {
				t.Errorf("connections made: %d, want 2", got)
			}
			if tc.mtu > 0 && fragments.Load() == 0 {
				t.Error("the new ClientHello was not fragmented: the case tests nothing")
			}
		})
	}
}

// A ClientHello from the session's address that does not echo a valid
// cookie (anyone can send one with a device's address: no cookie, or one
// made for another ClientHello) gets a HelloVerifyRequest from the
// listener, and the session goes on untouched. Without patch (54) the
// session drops it unanswered.
func TestBastionHelloAgainNeedsCookie(t *testing.T) {
	for _, tc := range []struct {
		name  string
		hello func(t *testing.T, echoed []byte) []byte
	}{
		{"no cookie", func(t *testing.T, _ []byte) []byte {
			t.Helper()

			return bastionClientHello(t)
		}},
		{"another ClientHello's cookie", func(t *testing.T, echoed []byte) []byte {
			t.Helper()
			b := bytes.Clone(echoed)
			// A new random: the cookie was made for the old one.
			b[recordlayer.FixedHeaderSize+handshake.HeaderLength+2+4] ^= 0xff

			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, conns, accepted := helloAgainListener(t)
			var armed atomic.Bool
			hvr := make(chan struct{}, 4)
			var mu sync.Mutex
			var echoed []byte // the client's ClientHello with the cookie
			tap := &tappedPacketConn{
				drop: func(b []byte) bool {
					if typ, _ := bastionHandshake(b); typ != handshake.TypeHelloVerifyRequest || !armed.Load() {
						return false
					}
					select {
					case hvr <- struct{}{}:
					default:
					}

					return true
				},
				wrote: func(b []byte) {
					if typ, seq := bastionHandshake(b); typ == handshake.TypeClientHello && seq == 1 {
						mu.Lock()
						echoed = bytes.Clone(b)
						mu.Unlock()
					}
				},
			}
			c := helloAgainClient(t, ln.Addr(), tap, 0, bastionPSKConfig())
			s := nextConn(t, conns)
			sv := bastionServe(t, s, true)
			bastionRoundTrip(t, c, s, sv, "before")

			mu.Lock()
			hello := tc.hello(t, echoed)
			mu.Unlock()
			armed.Store(true)
			if _, err := tap.UDPConn.WriteTo(hello, ln.Addr()); err != nil {
				t.Fatal(err)
			}
			select {
			case <-hvr:
			case <-time.After(helloAgainWait):
				t.Fatal("no HelloVerifyRequest for a ClientHello from the session's address")
			}
			bastionRoundTrip(t, c, s, sv, "after")
			select {
			case err := <-sv.ended:
				t.Fatalf("the session ended: %v", err)
			default:
			}
			if got := accepted.Load(); got != 1 {
				t.Errorf("connections made: %d, want 1", got)
			}
		})
	}
}

// The client's own ClientHello with the cookie, sent again after its
// handshake has completed (a retransmission, or a copy the network
// duplicated) while the cookie is still valid, is not a new handshake: its
// random is the session's, and the session goes on. Without the random's
// check the listener takes it for a new handshake and ends the session it
// has just made.
func TestBastionHelloAgainSameRandom(t *testing.T) {
	ln, conns, accepted := helloAgainListener(t)
	var mu sync.Mutex
	var echoed []byte
	tap := &tappedPacketConn{wrote: func(b []byte) {
		if typ, seq := bastionHandshake(b); typ == handshake.TypeClientHello && seq == 1 {
			mu.Lock()
			echoed = bytes.Clone(b)
			mu.Unlock()
		}
	}}
	c := helloAgainClient(t, ln.Addr(), tap, 0, bastionPSKConfig())
	s := nextConn(t, conns)
	sv := bastionServe(t, s, true)
	bastionRoundTrip(t, c, s, sv, "before")

	mu.Lock()
	again := echoed
	mu.Unlock()
	if again == nil {
		t.Fatal("the client sent no ClientHello with a cookie")
	}
	if _, err := tap.UDPConn.WriteTo(again, ln.Addr()); err != nil {
		t.Fatal(err)
	}
	// Read after the ClientHello, in order, by the listener's read loop.
	bastionRoundTrip(t, c, s, sv, "after")
	select {
	case err := <-sv.ended:
		t.Fatalf("the session ended: %v", err)
	default:
	}
	if s.isConnectionClosed() {
		t.Error("the session is closed")
	}
	if got := accepted.Load(); got != 1 {
		t.Errorf("connections made: %d, want 1", got)
	}
}

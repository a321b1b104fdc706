// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build linux && !386

package udp

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestBastionRawUDPAddrPort: the Linux listener I/O (Bastion patch) reads
// the datagrams a peer sent, in order, with the sender's address exactly as
// ReadFromUDPAddrPort gives it (the key of byAddr and conns), for an IPv4
// socket, an IPv6 one and a dual-stack one read from IPv4 (mapped); and
// its writes arrive from the listener's address.
func TestBastionRawUDPAddrPort(t *testing.T) {
	for _, tc := range []struct{ network, listen, peer string }{
		{"udp4", "127.0.0.1:0", "127.0.0.1:0"},
		{"udp6", "[::1]:0", "[::1]:0"},
		{"udp", "[::]:0", "127.0.0.1:0"},
	} {
		t.Run(tc.network+"-"+tc.listen+"-"+tc.peer, func(t *testing.T) {
			srv, err := net.ListenPacket(tc.network, tc.listen)
			if err != nil {
				t.Skipf("no %s socket here: %v", tc.listen, err)
			}
			defer srv.Close()
			ref, err := net.ListenPacket(tc.network, tc.listen)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			io := newUDPIO(srv.(*net.UDPConn), nil) //nolint:forcetypeassert
			raw, ok := io.(*rawUDP)
			if !ok {
				t.Fatalf("newUDPIO = %T, want *rawUDP on Linux", io)
			}
			peer, err := net.ListenPacket("udp", tc.peer)
			if err != nil {
				t.Fatal(err)
			}
			defer peer.Close()
			port := func(c net.PacketConn) int { return c.LocalAddr().(*net.UDPAddr).Port } //nolint:forcetypeassert
			host, _, _ := net.SplitHostPort(tc.peer)
			const n = 2 * readBatch
			for i := range n {
				for _, dst := range []net.PacketConn{srv, ref} {
					to := &net.UDPAddr{IP: net.ParseIP(host), Port: port(dst)}
					if _, err := peer.WriteTo([]byte(fmt.Sprint("datagram ", i)), to); err != nil {
						t.Fatal(err)
					}
				}
			}
			_ = ref.SetReadDeadline(time.Now().Add(5 * time.Second))
			var want netip.AddrPort
			buf := make([]byte, 100)
			for range n {
				_, ap, err := ref.(*net.UDPConn).ReadFromUDPAddrPort(buf) //nolint:forcetypeassert
				if err != nil {
					t.Fatal(err)
				}
				want = ap
			}
			var batch [readBatch]datagram
			got, maxBatch := 0, 0
			for got < n {
				k, err := raw.readBatch(&batch)
				if err != nil {
					t.Fatal(err)
				}
				maxBatch = max(maxBatch, k)
				for _, d := range batch[:k] {
					if w := fmt.Sprint("datagram ", got); string(d.b) != w {
						t.Fatalf("datagram %d = %q, want %q", got, d.b, w)
					}
					if d.addr != want {
						t.Fatalf("address %v (%#v), ReadFromUDPAddrPort gave %v (%#v)", d.addr, d.addr, want, want)
					}
					got++
				}
			}
			// All were queued before the first read: one recvmmsg takes
			// a full batch.
			if maxBatch != readBatch {
				t.Errorf("largest batch %d datagrams, want %d", maxBatch, readBatch)
			}
			// A write, to the address as read, arrives from the listener.
			if _, err := raw.writeTo([]byte("answer"), net.UDPAddrFromAddrPort(want), want); err != nil {
				t.Fatal(err)
			}
			_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
			k, from, err := peer.ReadFrom(buf)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:k], []byte("answer")) || from.(*net.UDPAddr).Port != port(srv) { //nolint:forcetypeassert
				t.Errorf("peer read %q from %v, want %q from port %d", buf[:k], from, "answer", port(srv))
			}
			// So does one that would not wait for room (patch (51)).
			raw.tryWriteTo([]byte("at once"), want)
			k, _, err = peer.ReadFrom(buf)
			if err != nil || string(buf[:k]) != "at once" {
				t.Errorf("peer read %q, %v after tryWriteTo, want %q", buf[:k], err, "at once")
			}
		})
	}
}

// TestBastionRawUDPErrors: errors are net.UDPConn's: a write to an address
// the socket cannot reach fails, and after Close reads and writes say
// net.ErrClosed.
func TestBastionRawUDPErrors(t *testing.T) {
	srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raw, ok := newUDPIO(srv.(*net.UDPConn), nil).(*rawUDP) //nolint:forcetypeassert
	if !ok {
		t.Fatal("no rawUDP")
	}
	v6 := netip.MustParseAddrPort("[2001:db8::1]:5684")
	if _, err := raw.writeTo([]byte("x"), net.UDPAddrFromAddrPort(v6), v6); err == nil {
		t.Error("write of an IPv6 address on an IPv4 socket: no error")
	}
	done := make(chan error, 1)
	go func() {
		var batch [readBatch]datagram
		_, err := raw.readBatch(&batch)
		done <- err
	}()
	_ = srv.Close()
	select {
	case err := <-done:
		var oe *net.OpError
		if !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) || oe.Op != "read" {
			t.Errorf("read after Close: %v, want a read *net.OpError wrapping net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read not ended by Close")
	}
	to := netip.MustParseAddrPort("127.0.0.1:9")
	if _, err := raw.writeTo([]byte("x"), net.UDPAddrFromAddrPort(to), to); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after Close: %v, want net.ErrClosed", err)
	}
}

// TestBastionRawUDPServe: serve (patch (48)) hands every datagram to
// dispatch once, in order, with its sender, whether datagrams come one at
// a time (each waited for: after each, serve waits for the socket without
// another recvmmsg, so one call per datagram) or in bursts larger than a
// batch; and it ends with net.ErrClosed when the socket is closed.
func TestBastionRawUDPServe(t *testing.T) {
	srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raw, ok := newUDPIO(srv.(*net.UDPConn), nil).(*rawUDP) //nolint:forcetypeassert
	if !ok {
		t.Fatal("newUDPIO is not *rawUDP on Linux")
	}
	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	type got struct {
		b  string
		ap netip.AddrPort
	}
	ch := make(chan got, 1024)
	ended := make(chan error, 1)
	go func() {
		ended <- raw.serve(func(b []byte, ap netip.AddrPort) { ch <- got{string(b), ap} })
	}()
	want := peer.LocalAddr().(*net.UDPAddr).AddrPort() //nolint:forcetypeassert
	recv := func(i int) {
		t.Helper()
		select {
		case g := <-ch:
			if w := fmt.Sprint("datagram ", i); g.b != w || g.ap != want {
				t.Fatalf("got %q from %v, want %q from %v", g.b, g.ap, w, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("datagram %d not dispatched", i)
		}
	}
	send := func(i int) {
		t.Helper()
		if _, err := peer.WriteTo([]byte(fmt.Sprint("datagram ", i)), srv.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	const single = 50
	for i := range single {
		send(i)
		recv(i)
	}
	// Each came alone: one recvmmsg each, none that found the socket
	// empty but the first, before anything was sent (the read loop before
	// made two per datagram).
	if n := raw.recvs.Load(); n > single+1 {
		t.Fatalf("%d recvmmsg calls for %d datagrams that came one at a time, want one each (and one at the start)", n, single)
	}
	const burst = 5*readBatch + 3
	for i := single; i < single+burst; i++ {
		send(i)
	}
	for i := single; i < single+burst; i++ {
		recv(i)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("serve ended with %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not end when the socket was closed")
	}
}

// TestBastionRawUDPZone (Bastion patch (52)): a write to an address with a
// zone goes out with sendto(2) too (net's write would wait for room), to
// the zone's interface, named or numbered; a zone no interface has is
// index 0, as net makes it.
func TestBastionRawUDPZone(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Skipf("no loopback interface named lo: %v", err)
	}
	srv, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	defer srv.Close()
	raw, ok := newUDPIO(srv.(*net.UDPConn), nil).(*rawUDP) //nolint:forcetypeassert
	if !ok {
		t.Fatal("newUDPIO is not *rawUDP on Linux")
	}
	peer, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	port := peer.LocalAddr().(*net.UDPAddr).Port //nolint:forcetypeassert
	buf := make([]byte, 100)
	for _, zone := range []string{"lo", fmt.Sprint(lo.Index)} {
		ap := netip.AddrPortFrom(netip.MustParseAddr("::1").WithZone(zone), uint16(port)) //nolint:gosec // a port
		if n, err := raw.writeTo([]byte("zone "+zone), net.UDPAddrFromAddrPort(ap), ap); err != nil || n != len("zone "+zone) {
			t.Fatalf("write to %v: %d, %v", ap, n, err)
		}
		_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, _, err := peer.ReadFrom(buf)
		if err != nil || string(buf[:k]) != "zone "+zone {
			t.Fatalf("after a write to %v the peer read %q, %v", ap, buf[:k], err)
		}
		if got := raw.zoneIndex(zone); got != uint32(lo.Index) { //nolint:gosec // an index
			t.Errorf("zoneIndex(%q) = %d, want %d", zone, got, lo.Index)
		}
	}
	if got := raw.zoneIndex("no-such-interface"); got != 0 {
		t.Errorf("zoneIndex of an unknown zone = %d, want 0", got)
	}
}

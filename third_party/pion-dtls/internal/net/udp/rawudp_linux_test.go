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
	"os/exec"
	"strings"
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
			// So does one without the address as a net.Addr (the read
			// loop's answers, patch (51)).
			if _, err := raw.writeTo([]byte("at once"), nil, want); err != nil {
				t.Fatal(err)
			}
			k, _, err = peer.ReadFrom(buf)
			if err != nil || string(buf[:k]) != "at once" {
				t.Errorf("peer read %q, %v after a write with no net.Addr, want %q", buf[:k], err, "at once")
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

// TestBastionRawUDPZone (Bastion patch (52)): a link-local exchange on
// two links (as root: network namespaces joined by veth pairs). The
// listener's namespace has two interfaces, both fe80::1, and behind each a
// peer in a namespace of its own, both fe80::2 and the same port: the
// peers' addresses differ only in their zones. The listener reads each
// peer's datagram with the zone of the interface it came in on, named as
// net names it (zone), and a write to each address as read, and to the
// same address with the interface's number as its zone, goes out with
// sendto(2) to that interface (zoneIndex) and reaches that peer and never
// the other. A zone that is ignored fails it: read, the two peers'
// addresses are the same; written, the answers all go out on one link,
// where the peer reads the other's. A zone no interface has is index 0,
// as net makes it.
//
// The listener's lookups of interfaces run in its namespace (inNetns), as
// the listener's run in the gateway's: the namespaces' interface indexes
// are their own. (net.InterfaceByName there also refills net's own zone
// cache, which is the process's, with the namespace's interfaces: the
// peers' zones are numbers, which net takes as they are, and nothing else
// in this package uses zones.) Datagrams are sent again until they arrive
// (a link just made may drop the first ones; UDP promises nothing anyway).
func TestBastionRawUDPZone(t *testing.T) {
	needNetns(t, "network namespaces and veth pairs", "ip")
	const tag = "zone"
	nsL := addNetns(t, tag+"-l")
	type link struct {
		dev, peerDev, ns string
		mac, peerMAC     string
		index, peerIndex int
		peer             *net.UDPConn
		from             netip.AddrPort  // the peer's address, as the listener read it
		sent             map[string]bool // the listener's writes to it
	}
	links := []*link{
		{dev: "zl1", peerDev: "zp1", mac: "02:00:00:00:52:01", peerMAC: "02:00:00:00:52:02"},
		{dev: "zl2", peerDev: "zp2", mac: "02:00:00:00:52:03", peerMAC: "02:00:00:00:52:04"},
	}
	for i, l := range links {
		l.ns = addNetns(t, fmt.Sprint(tag, "-p", i+1))
		l.sent = map[string]bool{}
		runCmd(t, "ip", "link", "add", l.dev, "address", l.mac, "netns", nsL,
			"type", "veth", "peer", "name", l.peerDev, "address", l.peerMAC, "netns", l.ns)
		for _, end := range []struct{ ns, dev, addr, neigh, neighMAC string }{
			{nsL, l.dev, "fe80::1/64", "fe80::2", l.peerMAC},
			{l.ns, l.peerDev, "fe80::2/64", "fe80::1", l.mac},
		} {
			// Only the address given here (no EUI-64 one), usable at once
			// (no duplicate address detection), and a static neighbour.
			runCmd(t, "ip", "-n", end.ns, "link", "set", end.dev, "addrgenmode", "none")
			runCmd(t, "ip", "-n", end.ns, "addr", "add", end.addr, "dev", end.dev, "nodad")
			runCmd(t, "ip", "-n", end.ns, "link", "set", end.dev, "up")
			runCmd(t, "ip", "-n", end.ns, "neigh", "add", end.neigh, "lladdr", end.neighMAC, "dev", end.dev, "nud", "permanent")
		}
	}
	for _, l := range links {
		waitLinkUp(t, nsL, l.dev)
		waitLinkUp(t, l.ns, l.peerDev)
	}

	var srv *net.UDPConn
	inNetns(t, nsL, func() error {
		c, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6unspecified})
		if err != nil {
			return err
		}
		srv = c
		for _, l := range links {
			ifi, err := net.InterfaceByName(l.dev)
			if err != nil {
				return err
			}
			l.index = ifi.Index
		}

		return nil
	})
	t.Cleanup(func() { _ = srv.Close() })
	raw, ok := newUDPIO(srv, nil).(*rawUDP)
	if !ok {
		t.Fatal("newUDPIO is not *rawUDP on Linux")
	}
	srvPort := uint16(srv.LocalAddr().(*net.UDPAddr).Port) //nolint:forcetypeassert,gosec // a port
	peerPort := 0
	for _, l := range links {
		inNetns(t, l.ns, func() error {
			c, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6unspecified, Port: peerPort})
			if err != nil {
				return err
			}
			l.peer = c
			peerPort = c.LocalAddr().(*net.UDPAddr).Port //nolint:forcetypeassert
			ifi, err := net.InterfaceByName(l.peerDev)
			if err != nil {
				return err
			}
			l.peerIndex = ifi.Index

			return nil
		})
		t.Cleanup(func() { _ = l.peer.Close() })
	}

	// Each peer sends to fe80::1 on its link (its zone a number: net's
	// names are the test process's namespace's), again and again until
	// the listener has read a datagram from each.
	stop := make(chan struct{})
	sent := make(chan error, 1)
	go func() {
		for {
			for _, l := range links {
				to := netip.AddrPortFrom(netip.MustParseAddr("fe80::1").WithZone(fmt.Sprint(l.peerIndex)), srvPort)
				if _, err := l.peer.WriteToUDPAddrPort([]byte("from "+l.peerDev), to); err != nil {
					sent <- fmt.Errorf("peer %s: write to %v: %w", l.peerDev, to, err)

					return
				}
			}
			select {
			case <-stop:
				sent <- nil

				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	inNetns(t, nsL, func() error {
		if err := srv.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return err
		}
		from := map[string]netip.AddrPort{}
		var batch [readBatch]datagram
		for len(from) < len(links) {
			k, err := raw.readBatch(&batch)
			if err != nil {
				return fmt.Errorf("read from %d of %d peers (%v): %w", len(from), len(links), from, err)
			}
			for _, d := range batch[:k] {
				if a, ok := from[string(d.b)]; ok && a != d.addr {
					return fmt.Errorf("%q read from %v and from %v", d.b, a, d.addr)
				}
				from[string(d.b)] = d.addr
			}
		}
		for _, l := range links {
			l.from = from["from "+l.peerDev]
		}

		return nil
	})
	close(stop)
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		want := netip.AddrPortFrom(netip.MustParseAddr("fe80::2").WithZone(l.dev), uint16(peerPort)) //nolint:gosec // a port
		if l.from != want {
			t.Fatalf("the datagram of the peer behind %s was read from %v, want %v", l.dev, l.from, want)
		}
	}

	// The listener answers each peer at the address it read, and at the
	// same address with the zone as a number, again until the peer reads
	// the answer; a peer never reads one meant for the other link.
	buf := make([]byte, 200)
	read := func(l *link, want string, wait time.Duration) bool {
		t.Helper()
		_ = l.peer.SetReadDeadline(time.Now().Add(wait))
		for {
			k, err := l.peer.Read(buf)
			if err != nil {
				return false // the deadline
			}
			got := string(buf[:k])
			for _, o := range links {
				if o != l && o.sent[got] {
					t.Fatalf("the peer behind %s read %q, meant for the peer behind %s", l.dev, got, o.dev)
				}
			}
			if got == want {
				return true
			}
			if !l.sent[got] {
				t.Fatalf("the peer behind %s read %q, want %q", l.dev, got, want)
			}
			// A copy of an answer already read: sent again.
		}
	}
	for _, l := range links {
		for _, to := range []netip.AddrPort{l.from, netip.AddrPortFrom(l.from.Addr().WithZone(fmt.Sprint(l.index)), l.from.Port())} {
			msg := "to " + to.String()
			l.sent[msg] = true
			for try := 0; ; try++ {
				if try == 20 {
					t.Fatalf("the peer behind %s did not read %q, written 20 times", l.dev, msg)
				}
				inNetns(t, nsL, func() error {
					if n, err := raw.writeTo([]byte(msg), net.UDPAddrFromAddrPort(to), to); err != nil || n != len(msg) {
						return fmt.Errorf("write to %v: %d, %w", to, n, err)
					}

					return nil
				})
				if read(l, msg, 250*time.Millisecond) {
					break
				}
				for _, o := range links {
					if o != l {
						read(o, "", time.Millisecond) // gone to the other link?
					}
				}
			}
		}
	}
	for _, l := range links {
		read(l, "", 200*time.Millisecond) // anything meant for the other link fails
	}
	inNetns(t, nsL, func() error {
		for _, l := range links {
			if got := raw.zoneIndex(l.dev); got != uint32(l.index) { //nolint:gosec // an index
				return fmt.Errorf("zoneIndex(%q) = %d, want %d", l.dev, got, l.index)
			}
		}
		if got := raw.zoneIndex("no-such-interface"); got != 0 {
			return fmt.Errorf("zoneIndex of an unknown zone = %d, want 0", got)
		}

		return nil
	})
}

// waitLinkUp waits until dev in network namespace ns is operationally up.
func waitLinkUp(t *testing.T, ns, dev string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := exec.Command("ip", "-n", ns, "-o", "link", "show", "dev", dev).CombinedOutput()
		if err != nil {
			t.Fatalf("ip -n %s link show dev %s: %v: %s", ns, dev, err, out)
		}
		if strings.Contains(string(out), " state UP ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s in %s is not up after 10 s: %s", dev, ns, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBastionZoneCache: both zone caches keep an answer that found an
// interface for zoneTTL and look again after it, keep no answer that found
// none, and hold at most maxZones.
func TestBastionZoneCache(t *testing.T) {
	var c zoneCache[string, uint32]
	lookups := 0
	found := true
	lookup := func(string) (uint32, bool) {
		lookups++

		return uint32(lookups), found
	}
	if got := c.get("eth0", lookup); got != 1 || lookups != 1 {
		t.Fatalf("first get = %d after %d lookups, want 1 after 1", got, lookups)
	}
	if got := c.get("eth0", lookup); got != 1 || lookups != 1 {
		t.Fatalf("a kept answer: get = %d after %d lookups, want 1 after 1", got, lookups)
	}
	e := c.m["eth0"]
	e.at = e.at.Add(-zoneTTL)
	c.m["eth0"] = e
	if got := c.get("eth0", lookup); got != 2 || lookups != 2 {
		t.Fatalf("an answer %v old: get = %d after %d lookups, want 2 after 2 (looked up again)", zoneTTL, got, lookups)
	}
	found = false
	for want := uint32(3); want < 5; want++ {
		if got := c.get("gone", lookup); got != want || lookups != int(want) {
			t.Fatalf("an answer that found no interface: get = %d after %d lookups, want %d after %d (not kept)", got, lookups, want, want)
		}
	}
	found = true
	for i := range 2 * maxZones {
		c.get(fmt.Sprint("if", i), lookup)
		if len(c.m) > maxZones {
			t.Fatalf("%d zones kept, want at most %d", len(c.m), maxZones)
		}
	}
}

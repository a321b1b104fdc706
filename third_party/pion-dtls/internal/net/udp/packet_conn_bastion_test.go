// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package udp

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestSameAddrMatchesString: sameAddr (Bastion patch) answers as comparing
// the addresses' strings did.
func TestSameAddrMatchesString(t *testing.T) {
	addrs := []net.Addr{
		&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5684},
		&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1).To4(), Port: 5684},
		&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5685},
		&net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 5684},
		&net.UDPAddr{IP: net.ParseIP("::1"), Port: 5684},
		&net.UDPAddr{IP: net.ParseIP("fe80::1"), Port: 5684, Zone: "eth0"},
		&net.UDPAddr{IP: net.ParseIP("fe80::1"), Port: 5684, Zone: "eth1"},
		&net.UDPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: 5684},
		&net.UDPAddr{Port: 5684},
		&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5684},
	}
	for _, a := range addrs {
		for _, b := range addrs {
			if got, want := sameAddr(a, b), a.String() == b.String(); got != want {
				t.Errorf("sameAddr(%v %T, %v %T) = %v, want %v", a, a, b, b, got, want)
			}
		}
	}
}

// TestBastionConnAddrKey (patch (35)): a connection is kept in conns under
// its address formatted once when it is made, which is raddr.String(), and
// Close removes it from conns and byAddr.
func TestBastionConnAddrKey(t *testing.T) {
	ln, lc, dc, err := pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dc.Close(); _ = ln.Close() }()
	l, _ := ln.(*listener)
	c, _ := lc.(*PacketConn)
	want := dc.LocalAddr().String()
	l.connLock.Lock()
	got, ok := l.conns[want]
	key := c.raddrKey
	l.connLock.Unlock()
	if !ok || got != c || key != want || key != c.raddr.String() {
		t.Fatalf("conns[%q] = %p (%v), connection %p with key %q, raddr %q", want, got, ok, c, key, c.raddr)
	}
	if err := lc.Close(); err != nil {
		t.Fatal(err)
	}
	l.connLock.Lock()
	n, m := len(l.conns), len(l.byAddr)
	l.connLock.Unlock()
	if n != 0 || m != 0 {
		t.Fatalf("after Close: %d in conns, %d in byAddr; want none", n, m)
	}
}

// TestBastionLazyWriteDeadline (patch (41)): a connection holds no write
// deadline until one is set; a deadline set in the past stops WriteTo as
// before, and clearing it lets writes through again.
func TestBastionLazyWriteDeadline(t *testing.T) {
	ln, lc, dc, err := pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = lc.Close(); _ = dc.Close(); _ = ln.Close() }()
	c, _ := lc.(*PacketConn)
	to := dc.LocalAddr()
	if _, err := c.WriteTo([]byte("a"), to); err != nil {
		t.Fatalf("write without a deadline: %v", err)
	}
	if err := c.SetWriteDeadline(time.Time{}); err != nil || c.writeDeadline.Load() != nil {
		t.Fatalf("clearing an unset deadline made one (%v)", err)
	}
	if err := c.SetWriteDeadline(time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteTo([]byte("b"), to); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write after the deadline: %v, want %v", err, context.DeadlineExceeded)
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteTo([]byte("c"), to); err != nil {
		t.Fatalf("write after clearing the deadline: %v", err)
	}
}

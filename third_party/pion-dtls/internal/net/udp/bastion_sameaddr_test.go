// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import (
	"net"
	"net/netip"
	"testing"
)

func TestBastionSameAddr(t *testing.T) {
	v4 := &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5684}
	addrs := []net.Addr{
		v4,
		&net.UDPAddr{IP: net.ParseIP("10.0.0.1").To4(), Port: 5684},
		&net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5685},
		&net.UDPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 5684},
		&net.UDPAddr{IP: net.ParseIP("fe80::1"), Port: 5684, Zone: "eth0"},
		&net.UDPAddr{IP: net.ParseIP("fe80::1"), Port: 5684, Zone: "eth1"},
		&net.UDPAddr{IP: net.ParseIP("fe80::1"), Port: 5684},
		&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 5684},
	}
	for _, a := range addrs {
		for _, b := range addrs {
			if got, want := sameAddr(a, b), a.String() == b.String(); got != want {
				t.Errorf("sameAddr(%v, %v) = %v, want %v (as their strings)", a, b, got, want)
			}
		}
	}
}

// TestBastionUDPAddrPort: the listener's byAddr key of a connection
// (udpAddrPort of the *net.UDPAddr it was accepted with, made from the
// datagram's netip.AddrPort) is the AddrPort its later datagrams carry.
func TestBastionUDPAddrPort(t *testing.T) {
	for _, s := range []string{"127.0.0.1:5684", "[::1]:1", "[::ffff:127.0.0.1]:65535", "[fe80::1%eth0]:5684", "0.0.0.0:0"} {
		ap := netip.MustParseAddrPort(s)
		if got := udpAddrPort(net.UDPAddrFromAddrPort(ap)); got != ap {
			t.Errorf("udpAddrPort(UDPAddrFromAddrPort(%v)) = %v", ap, got)
		}
	}
	if got := udpAddrPort(&net.UDPAddr{}); got.IsValid() {
		t.Errorf("udpAddrPort of an address without IP = %v, want invalid (no byAddr entry)", got)
	}
}

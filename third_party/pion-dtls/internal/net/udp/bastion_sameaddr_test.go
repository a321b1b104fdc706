// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import (
	"net"
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

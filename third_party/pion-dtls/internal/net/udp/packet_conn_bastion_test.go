// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package udp

import (
	"net"
	"testing"
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

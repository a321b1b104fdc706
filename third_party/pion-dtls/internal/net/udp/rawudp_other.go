// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build !linux || 386

package udp

import (
	"net"
	"net/netip"
)

func newUDPIO(conn *net.UDPConn, _ func(netip.AddrPort, int)) udpIO {
	return &portableUDP{conn: conn}
}

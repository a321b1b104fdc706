// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build !linux || 386

package udp

import "net"

func newUDPIO(conn *net.UDPConn) udpIO { return &portableUDP{conn: conn} }

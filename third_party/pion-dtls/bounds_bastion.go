// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"net"
	"net/netip"
)

// fragmentDropped tells Config.OnFragmentDropped of a handshake record of
// size bytes from from that the fragment buffer had no room for (Bastion
// patch (55)).
func (c *Conn) fragmentDropped(from net.Addr, size int) {
	f := c.handshakeConfig.onFragmentDropped
	if f == nil {
		return
	}
	var ap netip.AddrPort
	if u, ok := from.(*net.UDPAddr); ok {
		ap = u.AddrPort()
	}
	f(ap, size)
}

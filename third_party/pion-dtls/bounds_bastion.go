// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"errors"
	"net"
	"net/netip"
)

// errFragmentAfterHandshake: a handshake record with a fragment of a
// message to come, after a server's handshake has completed (Bastion
// patch (60)).
var errFragmentAfterHandshake = &InternalError{Err: errors.New("handshake fragment after the handshake")}

// fragmentDropped tells Config.OnFragmentDropped of a handshake record of
// size bytes from from that the fragment buffer had no room for (Bastion
// patch (55)) or, after a server's handshake, that held a fragment of a
// message to come (Bastion patch (60)).
func (c *Conn) fragmentDropped(from net.Addr, size int) {
	if c.handshakeConfig == nil { // a Conn a test made by hand
		return
	}
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

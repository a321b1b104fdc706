// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package udp

import (
	"net"
	"net/netip"
)

// readBatch is how many datagrams the read loop takes from the socket at
// once, where the system lets it (Bastion patch, rawudp_linux.go).
const readBatch = 8

// datagram is one datagram read: b is valid until the next readBatch.
type datagram struct {
	b    []byte
	addr netip.AddrPort
}

// udpIO is how the listener reads and writes its socket (Bastion patch,
// third_party/README.md): on Linux without the runtime's syscall entry and
// in batches (rawudp_linux.go), elsewhere through net.UDPConn.
type udpIO interface {
	// readBatch reads one or more datagrams into dst and returns how
	// many; it waits for the first.
	readBatch(dst *[readBatch]datagram) (int, error)
	// writeTo sends b to ap; addr is ap as a net.Addr, or nil (then made
	// from ap where needed). ap is invalid when addr is not a UDP address.
	// Every write on the listener's socket goes through it: a connection's
	// (PacketConn.WriteTo) and the read loop's answers to datagrams from
	// unverified addresses (ListenConfig.HelloVerify, patch (51)).
	//
	// Whether it waits for room in the socket differs by platform, here
	// only: on Linux (rawUDP, linux && !386) it never waits: a datagram
	// the socket cannot take now is dropped, reported to
	// ListenConfig.WriteDropped and returned as sent (Bastion patch (52),
	// rawUDP.send). Elsewhere (portableUDP: other systems, linux/386, and a
	// Linux socket rawUDP cannot drive) it waits as net.UDPConn's write
	// does, the read loop's answers too: net has no send that never waits.
	writeTo(b []byte, addr net.Addr, ap netip.AddrPort) (int, error)
}

// portableUDP is net.UDPConn's I/O, one datagram per read.
type portableUDP struct {
	conn *net.UDPConn
	buf  [receiveMTU]byte
}

func (p *portableUDP) readBatch(dst *[readBatch]datagram) (int, error) {
	n, ap, err := p.conn.ReadFromUDPAddrPort(p.buf[:])
	if err != nil {
		return 0, err
	}
	dst[0] = datagram{b: p.buf[:n], addr: ap}

	return 1, nil
}

// writeTo waits for room in the socket when it has none (see udpIO).
func (p *portableUDP) writeTo(b []byte, addr net.Addr, ap netip.AddrPort) (int, error) {
	if addr == nil {
		return p.conn.WriteToUDPAddrPort(b, ap)
	}

	return p.conn.WriteTo(b, addr)
}

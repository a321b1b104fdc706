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
	// writeTo sends b to addr, which is ap (invalid when addr is not a UDP
	// address). On Linux it never waits for room in the socket: a
	// datagram the socket cannot take now is dropped, reported to
	// ListenConfig.WriteDropped and returned as sent (Bastion patch (52),
	// rawUDP.send).
	writeTo(b []byte, addr net.Addr, ap netip.AddrPort) (int, error)
	// tryWriteTo sends b to ap if the socket takes it at once, and drops
	// it otherwise (Bastion patch (51): the read loop's answers to
	// datagrams from unverified addresses never wait).
	tryWriteTo(b []byte, ap netip.AddrPort)
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

// writeTo and tryWriteTo wait for room in the socket when it has none:
// net has no send that never waits (patch (52) is Linux's rawUDP only).
func (p *portableUDP) writeTo(b []byte, addr net.Addr, _ netip.AddrPort) (int, error) {
	return p.conn.WriteTo(b, addr)
}

func (p *portableUDP) tryWriteTo(b []byte, ap netip.AddrPort) {
	_, _ = p.conn.WriteToUDPAddrPort(b, ap)
}

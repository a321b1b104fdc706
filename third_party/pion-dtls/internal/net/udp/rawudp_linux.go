// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

//go:build linux && !386

package udp

import (
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// rawUDP is the listener's socket I/O on Linux (Bastion patch,
// third_party/README.md): the read loop takes up to readBatch datagrams
// per recvmmsg(2), and datagrams are sent with sendto(2), both entered
// with syscall.RawSyscall instead of the runtime's syscall entry.
//
// Why: the socket is non-blocking (the runtime's poller waits for it, as
// net.UDPConn does: RawConn.Read parks the goroutine on EAGAIN; a write
// never waits, patch (52), see send), so these calls return at once and
// the runtime's entry only costs: it
// marks the P as in a syscall and, when the other Ps were idle, wakes the
// runtime's sysmon thread. One recvmmsg instead of one recvfrom per
// datagram saves a system call per datagram that was already queued, and
// the EAGAIN read before the read loop parks is made once per batch.
//
// What does not change: the datagrams, their order, the addresses (the
// netip.AddrPort ReadFromUDPAddrPort gives for the same datagram,
// TestBastionRawUDPAddrPort), errors as *net.OpError around the same
// errno or poller error (net.ErrClosed after Close).
type rawUDP struct {
	conn   *net.UDPConn
	rc     syscall.RawConn
	family int

	// Read state: only the read loop reads.
	bufs   [readBatch][receiveMTU]byte
	msgs   [readBatch]mmsghdr
	iovs   [readBatch]syscall.Iovec
	names  [readBatch]syscall.RawSockaddrInet6
	rn     int
	rerrno syscall.Errno
	readFn func(fd uintptr) bool
	// serve's callback and what it hands datagrams to (patch (48)).
	serveFn  func(fd uintptr) bool
	dispatch func(b []byte, ap netip.AddrPort)
	recvs    atomic.Int64 // recvmmsg calls serve made (for its test)
	// zones names the zones of the datagrams read (zone).
	zones zoneCache[uint32, string]

	// Write state: the callbacks RawConn runs are made once, with their
	// arguments here, so a write allocates nothing; wmu serialises writers
	// as net.UDPConn's write lock does, but only around one sendto: no
	// write waits for room in the socket (Bastion patch (52), send).
	wmu     sync.Mutex
	wbuf    []byte
	wsa     syscall.RawSockaddrInet6
	wsalen  uintptr
	wn      int
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
	// wzones are the interface indexes of the zones written to (under
	// wmu; zoneIndex).
	wzones zoneCache[string, uint32]
	// dropped is told of each datagram dropped for want of room
	// (ListenConfig.WriteDropped); nil: none is told.
	dropped func(to netip.AddrPort, size int)
}

// mmsghdr is struct mmsghdr: Go pads it to Msghdr's alignment as C does.
type mmsghdr struct {
	hdr syscall.Msghdr
	len uint32
}

const msgWaitForOne = 0x10000 // MSG_WAITFORONE

func newUDPIO(conn *net.UDPConn, dropped func(to netip.AddrPort, size int)) udpIO {
	rc, err := conn.SyscallConn()
	if err != nil {
		return &portableUDP{conn: conn}
	}
	family := 0
	if cerr := rc.Control(func(fd uintptr) {
		sa, err := syscall.Getsockname(int(fd))
		if err != nil {
			return
		}
		switch sa.(type) {
		case *syscall.SockaddrInet4:
			family = syscall.AF_INET
		case *syscall.SockaddrInet6:
			family = syscall.AF_INET6
		}
	}); cerr != nil || family == 0 {
		return &portableUDP{conn: conn}
	}
	r := &rawUDP{conn: conn, rc: rc, family: family, dropped: dropped}
	for i := range r.msgs {
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(receiveMTU)
		h := &r.msgs[i].hdr
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Iov = &r.iovs[i]
		h.Iovlen = 1
	}
	r.readFn, r.writeFn, r.serveFn = r.read, r.write, r.serveRead

	return r
}

// read is RawConn.Read's callback: false asks the poller to wait until the
// socket is readable and call it again.
func (r *rawUDP) read(fd uintptr) bool {
	r.rn, r.rerrno = r.recvmmsg(fd)

	return r.rerrno != syscall.EAGAIN
}

// recvmmsg reads up to readBatch datagrams into r.bufs (EINTR retried).
func (r *rawUDP) recvmmsg(fd uintptr) (int, syscall.Errno) {
	for i := range r.msgs {
		r.msgs[i].hdr.Namelen = syscall.SizeofSockaddrInet6
		r.msgs[i].hdr.Flags = 0
		r.msgs[i].len = 0
	}
	for {
		n, _, e := syscall.RawSyscall6(syscall.SYS_RECVMMSG, fd,
			uintptr(unsafe.Pointer(&r.msgs[0])), readBatch, msgWaitForOne, 0, 0)
		if e != syscall.EINTR {
			return int(n), e
		}
	}
}

// serve is the read loop (Bastion patch (48)): it reads batches as
// readBatch does and hands each datagram to dispatch, until reading fails,
// all inside one RawConn.Read, so that after a batch shorter than
// readBatch it waits for the socket to become readable instead of calling
// recvmmsg once more only to get EAGAIN (one system call less for every
// datagram that arrives on its own, as each of a handshake's flights and
// most requests do).
//
// Why no datagram is left behind: recvmmsg with MSG_WAITFORONE stops
// before readBatch only when the next receive failed, with EAGAIN (the
// queue was empty) or with an error it keeps for the next call (which the
// socket also reports as readable). A datagram queued after that is a new
// readiness event for the poller, which the wait below takes even if it
// came while the batch was being dispatched: the poller keeps it (pdReady)
// until the wait, and only a new RawConn.Read, which this loop does not
// make between batches, would reset it. The datagrams, their order and
// the errors are readBatch's; dispatch runs where readLoop ran it, on the
// read loop's goroutine, now while it holds the socket's read lock (only
// the read loop reads; Close of the socket waits for the loop to return).
func (r *rawUDP) serve(dispatch func(b []byte, ap netip.AddrPort)) error {
	r.dispatch, r.rerrno = dispatch, 0
	err := r.rc.Read(r.serveFn)
	r.dispatch = nil
	if err != nil {
		return r.opError("read", nil, unwrapOpError(err))
	}

	return r.opError("read", nil, os.NewSyscallError("recvmmsg", r.rerrno))
}

// serveRead is serve's RawConn.Read callback: it returns true only to end
// the loop (an error in rerrno), false to wait for readability.
func (r *rawUDP) serveRead(fd uintptr) bool {
	for {
		n, e := r.recvmmsg(fd)
		r.recvs.Add(1)
		switch e {
		case 0:
		case syscall.EAGAIN:
			return false
		default:
			r.rerrno = e

			return true
		}
		for i := range n {
			m := int(r.msgs[i].len)
			if m > receiveMTU {
				m = receiveMTU
			}
			r.dispatch(r.bufs[i][:m], r.addrPort(&r.names[i]))
		}
		if n < readBatch {
			return false
		}
	}
}

func (r *rawUDP) readBatch(dst *[readBatch]datagram) (int, error) {
	r.rn, r.rerrno = 0, 0
	if err := r.rc.Read(r.readFn); err != nil {
		return 0, r.opError("read", nil, unwrapOpError(err))
	}
	if r.rerrno != 0 {
		return 0, r.opError("read", nil, os.NewSyscallError("recvmmsg", r.rerrno))
	}
	for i := range r.rn {
		n := int(r.msgs[i].len)
		if n > receiveMTU {
			n = receiveMTU
		}
		dst[i] = datagram{b: r.bufs[i][:n], addr: r.addrPort(&r.names[i])}
	}

	return r.rn, nil
}

// addrPort is what ReadFromUDPAddrPort makes of the sender's address: an
// IPv4 address from an IPv4 socket, a 16-byte one (IPv4-mapped too) from
// an IPv6 socket, with the zone named as net names it.
func (r *rawUDP) addrPort(sa *syscall.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case syscall.AF_INET:
		sa4 := (*syscall.RawSockaddrInet4)(unsafe.Pointer(sa))
		p := (*[2]byte)(unsafe.Pointer(&sa4.Port))

		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), uint16(p[0])<<8|uint16(p[1]))
	case syscall.AF_INET6:
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		a := netip.AddrFrom16(sa.Addr)
		if sa.Scope_id != 0 {
			a = a.WithZone(r.zone(sa.Scope_id))
		}

		return netip.AddrPortFrom(a, uint16(p[0])<<8|uint16(p[1]))
	}

	return netip.AddrPort{}
}

// zone names interface index i as net's zone cache does: its name, or
// the number when no interface has it (zoneCache says for how long).
func (r *rawUDP) zone(i uint32) string {
	return r.zones.get(i, func(i uint32) (string, bool) {
		if ifi, err := net.InterfaceByIndex(int(i)); err == nil {
			return ifi.Name, true
		}

		return strconv.FormatUint(uint64(i), 10), false
	})
}

// write is RawConn.Write's callback. It always returns true: at EAGAIN
// (no room in the socket's send buffer) too, so that RawConn.Write never
// parks the writer until the socket is writable (Bastion patch (52),
// send).
func (r *rawUDP) write(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, fd,
			uintptr(unsafe.Pointer(unsafe.SliceData(r.wbuf))), uintptr(len(r.wbuf)), 0,
			uintptr(unsafe.Pointer(&r.wsa)), r.wsalen)
		if e == syscall.EINTR {
			continue
		}
		r.wn, r.werrno = int(n), e

		return true
	}
}

// writeTo sends b to ap (addr is ap as a net.Addr, or nil: made from ap
// where net needs it, for errors). It never waits: see send.
func (r *rawUDP) writeTo(b []byte, addr net.Addr, ap netip.AddrPort) (int, error) {
	return r.send(b, addr, ap)
}

// send sends b to ap if the socket has room for it now, and otherwise
// drops it, tells dropped and reports it sent (addr may be nil: made from
// ap where net needs it).
//
// Why it never waits (Bastion patch (52)): the socket is the listener's,
// shared by every session and by the read loop's HelloVerifyRequests.
// While its send buffer is full, a send that waited for room held wmu,
// and every other writer waited behind it: a deferred CoAP answer written
// by the durable queue's writer (which then held up every commit), a
// command notification written under the hub's delivery lock, and the
// read loop at its next HelloVerifyRequest. Anyone on the LAN can fill
// the buffer: datagrams to an address whose link-layer address is being
// resolved wait in the kernel's neighbour queue charged to the socket,
// and ClientHellos from made-up addresses on the LAN make the listener
// answer exactly such addresses. A dropped datagram is what UDP allows
// anyway, and everything written here survives one: a DTLS handshake
// retransmits its flights, a confirmable CoAP request is retransmitted
// and answered again from the response cache, and a non-confirmable one
// is not acknowledged. The drop looks like a sent datagram to the caller
// (as one lost on the wire would): an error would end a handshake or make
// the caller close its connection.
func (r *rawUDP) send(b []byte, addr net.Addr, ap netip.AddrPort) (int, error) {
	netAddr := func() net.Addr {
		if addr == nil {
			return net.UDPAddrFromAddrPort(ap)
		}

		return addr
	}
	if !ap.IsValid() {
		// An address that is not a UDP one: net's error for it (net
		// writes only to a *net.UDPAddr, which gives a valid ap).
		return r.conn.WriteTo(b, netAddr())
	}
	r.wmu.Lock()
	r.wsa = syscall.RawSockaddrInet6{}
	ip := ap.Addr()
	switch {
	case r.family == syscall.AF_INET:
		if !ip.Unmap().Is4() {
			r.wmu.Unlock()

			return r.conn.WriteTo(b, netAddr()) // net's error for it
		}
		sa4 := (*syscall.RawSockaddrInet4)(unsafe.Pointer(&r.wsa))
		sa4.Family = syscall.AF_INET
		sa4.Addr = ip.Unmap().As4()
		p := (*[2]byte)(unsafe.Pointer(&sa4.Port))
		p[0], p[1] = byte(ap.Port()>>8), byte(ap.Port())
		r.wsalen = syscall.SizeofSockaddrInet4
	default:
		r.wsa.Family = syscall.AF_INET6
		r.wsa.Addr = ip.As16()
		if z := ip.Zone(); z != "" {
			// A link-local peer: net's path, which names the zone's
			// interface, would wait for room.
			r.wsa.Scope_id = r.zoneIndex(z)
		}
		p := (*[2]byte)(unsafe.Pointer(&r.wsa.Port))
		p[0], p[1] = byte(ap.Port()>>8), byte(ap.Port())
		r.wsalen = syscall.SizeofSockaddrInet6
	}
	r.wbuf, r.wn, r.werrno = b, 0, 0
	err := r.rc.Write(r.writeFn)
	r.wbuf = nil
	n, errno := r.wn, r.werrno
	r.wmu.Unlock()
	switch {
	case err != nil:
		return 0, r.opError("write", netAddr(), unwrapOpError(err))
	case errno == syscall.EAGAIN:
		if r.dropped != nil {
			r.dropped(ap, len(b))
		}

		return len(b), nil
	case errno != 0:
		return 0, r.opError("write", netAddr(), os.NewSyscallError("sendto", errno))
	}

	return n, nil
}

// zoneIndex is the index of the interface zone names, as net finds it for
// a write: a name, or a number; 0 if it is neither, as net makes it (no
// interface given: the kernel picks one by its routes). zoneCache says
// for how long an answer is kept. wmu is held.
func (r *rawUDP) zoneIndex(zone string) uint32 {
	return r.wzones.get(zone, func(zone string) (uint32, bool) {
		if ifi, err := net.InterfaceByName(zone); err == nil {
			return uint32(ifi.Index), true //nolint:gosec // G115, an interface index
		}
		if n, err := strconv.ParseUint(zone, 10, 32); err == nil {
			return uint32(n), false
		}

		return 0, false
	})
}

// zoneCache keeps what the interface lookups of IPv6 zones (link-local
// peers) found, one way each: the read loop's (rawUDP.zones) an index's
// name (zone), the writers' (wzones, under wmu) a name's index
// (zoneIndex). Two caches, so that the read loop never waits for a lock a
// writer holds; one type, so that both expire alike, as net's own zone
// cache does:
//   - an answer that found an interface is kept for zoneTTL (net fetches
//     the interface list again when its copy is a minute old): an
//     interface renamed, or deleted and made again with a new index, is
//     seen both ways within a minute;
//   - an answer that found none (the index as a number; a number, or 0,
//     for a name) is not kept (net, too, fetches the list again at once
//     for a zone it does not know): an interface that appears is found by
//     the next datagram.
//
// Zones come from the addresses datagrams were read from, i.e. from the
// host's interfaces; at most maxZones are kept, all dropped when that many
// are.
type zoneCache[K comparable, V any] struct {
	m map[K]zoneEntry[V]
}

// zoneEntry is an answer zoneCache keeps, and when it was found.
type zoneEntry[V any] struct {
	v  V
	at time.Time
}

// maxZones bounds a zoneCache.
const maxZones = 64

// zoneTTL is how long a zoneCache keeps an answer: as long as net keeps
// the interface list its zone cache is made of.
const zoneTTL = time.Minute

// get returns k's answer, kept or from lookup, which also reports whether
// it found an interface (only then is the answer kept).
func (c *zoneCache[K, V]) get(k K, lookup func(K) (V, bool)) V {
	now := time.Now()
	if e, ok := c.m[k]; ok && now.Sub(e.at) < zoneTTL {
		return e.v
	}
	v, found := lookup(k)
	if !found {
		delete(c.m, k)

		return v
	}
	if c.m == nil {
		c.m = map[K]zoneEntry[V]{}
	}
	if len(c.m) >= maxZones {
		clear(c.m)
	}
	c.m[k] = zoneEntry[V]{v: v, at: now}

	return v
}

func (r *rawUDP) opError(op string, addr net.Addr, err error) error {
	return &net.OpError{Op: op, Net: "udp", Source: r.conn.LocalAddr(), Addr: addr, Err: err}
}

// unwrapOpError takes RawConn's "raw-read"/"raw-write" *net.OpError apart,
// so that the error says "read" or "write" around the same cause as
// net.UDPConn's would.
func unwrapOpError(err error) error {
	if oe, ok := err.(*net.OpError); ok { //nolint:errorlint // RawConn's own type
		return oe.Err
	}

	return err
}

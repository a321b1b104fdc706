// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

// Package udp implements DTLS specific UDP networking primitives.
// NOTE: this package is an adaption of pion/transport/udp that allows for
// routing datagrams based on identifiers other than the remote address. The
// primary use case for this functionality is routing based on DTLS connection
// IDs. In order to allow for consumers of this package to treat connections as
// generic net.PackageConn, routing and identitier establishment is based on
// custom introspecion of datagrams, rather than direct intervention by
// consumers. If possible, the updates made in this repository will be reflected
// back upstream. If not, it is likely that this will be moved to a public
// package in this repository.
//
// This package was migrated from pion/transport/udp at
// https://github.com/pion/transport/commit/6890c795c807a617c054149eee40a69d7fdfbfdb
package udp

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	idtlsnet "github.com/pion/dtls/v3/internal/net"
	dtlsnet "github.com/pion/dtls/v3/pkg/net"
	"github.com/pion/transport/v5/deadline"
)

const (
	receiveMTU           = 8192
	defaultListenBacklog = 128 // same as Linux default

	// A connection's queue of datagrams waiting for its reader holds at
	// most queueMaxPackets of them and queueMaxBytes of their bytes;
	// the read loop drops a datagram beyond either (Bastion patch (56):
	// pion's queue had no bound, so a peer whose connection's reader was
	// busy, or whose application did not read, made it hold whatever it
	// sent). What is dropped is sent again: DTLS retransmits its flights,
	// CoAP its confirmable requests. 64 KiB takes a whole certificate
	// flight (what the fragment buffer holds, patch (55)) with room to
	// spare, 128 datagrams one of small records.
	queueMaxPackets = 128
	queueMaxBytes   = 64 << 10
)

// Typed errors.
var (
	ErrClosedListener      = errors.New("udp: listener closed")
	ErrListenQueueExceeded = errors.New("udp: listen queue exceeded")
)

// listener augments a connection-oriented Listener over a UDP PacketConn.
type listener struct {
	pConn *net.UDPConn
	// io reads and writes pConn (Bastion patch, udpio.go).
	io udpIO

	accepting    atomic.Value // bool
	acceptCh     chan *PacketConn
	doneCh       chan struct{}
	doneOnce     sync.Once
	acceptFilter func([]byte) bool
	helloVerify  func(b []byte, from netip.AddrPort, reply []byte) (int, bool, uint64)
	readDropped  func(from netip.AddrPort, size int)
	// verifyReply is helloVerify's reply buffer; only the read loop uses it.
	verifyReply    [verifyReplyRoom]byte
	datagramRouter func([]byte) (string, bool)
	connIdentifier func([]byte) (string, bool)

	connLock sync.Mutex
	conns    map[string]*PacketConn
	// byAddr has each connection that conns has under its remote address,
	// under that address as read (Bastion patch, third_party/README.md):
	// readLoop finds it without formatting the address.
	byAddr map[netip.AddrPort]*PacketConn
	connWG sync.WaitGroup

	readWG   sync.WaitGroup
	errClose atomic.Value // error

	readDoneCh chan struct{}
	errRead    atomic.Value // error

	// inlineConn is the connection whose inline reader the read loop is
	// running, if any (Bastion patch, see PacketConn.SetInlineReader), or
	// that it is ending for a new handshake (patch (54), helloAgain).
	inlineConn atomic.Pointer[PacketConn]

	// spare runs the connections' record readers (Bastion patch, see
	// PacketConn.Go).
	spare *spareGoroutines
}

// Accept waits for and returns the next connection to the listener.
func (l *listener) Accept() (net.PacketConn, net.Addr, error) {
	select {
	case c := <-l.acceptCh:
		return c, c.raddr, nil

	case <-l.readDoneCh:
		err, _ := l.errRead.Load().(error)

		return nil, nil, err

	case <-l.doneCh:
		return nil, nil, ErrClosedListener
	}
}

// Close closes the listener.
// Any blocked Accept operations will be unblocked and return errors.
func (l *listener) Close() error {
	var err error
	l.doneOnce.Do(func() {
		l.connLock.Lock()
		l.accepting.Store(false)
		close(l.doneCh)

		// Close unaccepted connections
		var pending []*PacketConn
	lclose:
		for {
			select {
			case c := <-l.acceptCh:
				pending = append(pending, c)
			default:
				break lclose
			}
		}
		l.connLock.Unlock()

		l.connWG.Done()
		for _, conn := range pending {
			_ = conn.Close()
		}
		l.connLock.Lock()
		nConns := len(l.conns)
		l.connLock.Unlock()

		if nConns == 0 {
			// Wait if this is the final connection.
			l.readWG.Wait()
			if errClose, ok := l.errClose.Load().(error); ok {
				err = errClose
			}
		} else {
			err = nil
		}
	})

	return err
}

// Addr returns the listener's network address.
func (l *listener) Addr() net.Addr {
	return l.pConn.LocalAddr()
}

// ListenConfig stores options for listening to an address.
type ListenConfig struct {
	// Backlog defines the maximum length of the queue of pending
	// connections. It is equivalent of the backlog argument of
	// POSIX listen function.
	// If a connection request arrives when the queue is full,
	// the request will be silently discarded, unlike TCP.
	// Set zero to use default value 128 which is same as Linux default.
	Backlog int

	// AcceptFilter determines whether the new conn should be made for
	// the incoming packet. If not set, any packet creates new conn.
	AcceptFilter func([]byte) bool

	// HelloVerify, when set, is offered every datagram from an address
	// that has no connection, on the read loop, before AcceptFilter
	// (Bastion patch (51), third_party/README.md): it may write a reply
	// into reply (at most verifyReplyRoom bytes), which the listener sends
	// back to from, and it decides whether a connection is made for the
	// datagram; tag is kept with that connection (PacketConn.AcceptTag).
	// It must not block or keep b or reply. A DTLS server answers a
	// ClientHello with a HelloVerifyRequest here without keeping any state,
	// and lets through only a ClientHello that echoes a valid cookie.
	HelloVerify func(b []byte, from netip.AddrPort, reply []byte) (n int, accept bool, tag uint64)

	// WriteDropped, when set, is told of every datagram a write on the
	// listener's socket dropped because the socket had no room for it
	// (Bastion patch (52), third_party/README.md): on Linux no write on
	// the shared socket waits for room, and the dropped datagram is
	// reported to its writer as sent. It runs on the writer's goroutine,
	// which may be the read loop, and must not block.
	WriteDropped func(to netip.AddrPort, size int)

	// ReadDropped, when set, is told of every datagram the read loop
	// dropped because the queue of the connection it was for, the
	// datagrams waiting for the connection's reader, was full (Bastion
	// patch (56)). It runs on the read loop and must not block.
	ReadDropped func(from netip.AddrPort, size int)

	// DatagramRouter routes an incoming datagram to a connection by extracting
	// an identifier from the its paylod
	DatagramRouter func([]byte) (string, bool)

	// ConnectionIdentifier extracts an identifier from an outgoing packet. If
	// the identifier is not already associated with the connection, it will be
	// added.
	ConnectionIdentifier func([]byte) (string, bool)

	// Internal listen config used to open the UDP socket.
	ListenConfig net.ListenConfig
}

// Listen creates a new listener based on the ListenConfig.
//
//nolint:contextcheck
func (lc *ListenConfig) Listen(network string, laddr *net.UDPAddr) (dtlsnet.PacketListener, error) {
	if lc.Backlog == 0 {
		lc.Backlog = defaultListenBacklog
	}

	laddrStr := ":0"
	if laddr != nil {
		laddrStr = laddr.String()
	}
	innerConn, err := lc.ListenConfig.ListenPacket(context.Background(), network, laddrStr)
	if err != nil {
		return nil, err
	}
	conn, ok := innerConn.(*net.UDPConn)
	if !ok {
		return nil, errors.New("listen packet not a *net.UDPConn") //nolint:err113
	}

	packetListener := &listener{
		pConn:          conn,
		io:             newUDPIO(conn, lc.WriteDropped),
		acceptCh:       make(chan *PacketConn, lc.Backlog),
		conns:          make(map[string]*PacketConn),
		byAddr:         make(map[netip.AddrPort]*PacketConn),
		doneCh:         make(chan struct{}),
		acceptFilter:   lc.AcceptFilter,
		helloVerify:    lc.HelloVerify,
		readDropped:    lc.ReadDropped,
		datagramRouter: lc.DatagramRouter,
		connIdentifier: lc.ConnectionIdentifier,
		readDoneCh:     make(chan struct{}),
	}
	packetListener.spare = newSpareGoroutines(packetListener.doneCh)

	packetListener.accepting.Store(true)
	packetListener.connWG.Add(1)
	packetListener.readWG.Add(2) // wait readLoop and Close execution routine

	go packetListener.readLoop()
	go func() {
		packetListener.connWG.Wait()
		if err := packetListener.pConn.Close(); err != nil {
			packetListener.errClose.Store(err)
		}
		packetListener.readWG.Done()
	}()

	return packetListener, nil
}

// Listen creates a new listener using default ListenConfig.
func Listen(network string, laddr *net.UDPAddr) (dtlsnet.PacketListener, error) {
	return (&ListenConfig{}).Listen(network, laddr)
}

// readLoop dispatches packets to the proper connection, creating a new one if
// necessary, until all connections are closed.
func (l *listener) readLoop() {
	defer l.readWG.Done()
	defer close(l.readDoneCh)

	// Bastion patch (third_party/README.md): datagrams are read in
	// batches where the system allows (udpio.go), the address as a value,
	// and a known connection's own *net.UDPAddr is handed on.
	// Bastion patch (48): a reader that can dispatch inside its own read
	// loop does, without a system call only to find the socket empty.
	if s, ok := l.io.(interface {
		serve(dispatch func(b []byte, ap netip.AddrPort)) error
	}); ok {
		l.errRead.Store(s.serve(l.dispatch))

		return
	}
	var batch [readBatch]datagram
	for {
		n, err := l.io.readBatch(&batch)
		if err != nil {
			l.errRead.Store(err)

			return
		}
		for i := range n {
			l.dispatch(batch[i].b, batch[i].addr)
		}
	}
}

// dispatch hands one datagram read from ap to its connection, making the
// connection if getConn accepts it.
func (l *listener) dispatch(buf []byte, ap netip.AddrPort) {
	conn, raddr, byAddr := l.route(ap, buf)
	// Bastion patch (54): a new handshake from the address of an
	// established connection (a device that restarted with the same
	// source port) is answered as one from a new address.
	if byAddr && l.helloVerify != nil {
		if r, _ := conn.replacer.Load().(Replacer); r != nil && r.NewHello(buf) {
			l.helloAgain(conn, r, buf, ap)

			return
		}
	}
	if conn != nil {
		// Bastion patch: a connection with an inline reader takes the
		// datagram here when nothing is queued before it (in order) and
		// it can (see SetInlineReader); anything else is queued.
		if f := conn.inline.Load(); f != nil && conn.buffer.Empty() {
			l.inlineConn.Store(conn)
			done := (*f)(buf, raddr)
			l.inlineConn.Store(nil)
			if done {
				return
			}
		}
		if _, err := conn.buffer.WriteTo(buf, raddr); errors.Is(err, idtlsnet.ErrFull) {
			// Bastion patch (56): the queue is bounded.
			if l.readDropped != nil {
				l.readDropped(ap, len(buf))
			}

			return
		}
		// Bastion patch (22): the connection's reader may wait for this.
		if f := conn.onQueue.Load(); f != nil {
			(*f)()
		}

		return
	}
	var tag uint64 // 0: no tag
	if l.helloVerify != nil {
		t, accept := l.verify(buf, ap)
		if !accept {
			return
		}
		tag = t
	}
	l.accept(buf, ap, tag)
}

// accept hands buf from ap to a new connection, made if getConn accepts
// it, with tag.
func (l *listener) accept(buf []byte, ap netip.AddrPort, tag uint64) {
	raddr := net.UDPAddrFromAddrPort(ap)
	conn, ok, err := l.getConn(raddr, buf, tag)
	if err != nil {
		return
	}
	if ok {
		_, _ = conn.buffer.WriteTo(buf, raddr)
	}
}

// verify offers buf from ap to helloVerify while the listener accepts,
// sends its reply, and returns the new connection's tag and whether one
// is to be made (Bastion patch (51)).
func (l *listener) verify(buf []byte, ap netip.AddrPort) (uint64, bool) {
	if accepting, _ := l.accepting.Load().(bool); !accepting {
		return 0, false
	}
	n, accept, t := l.helloVerify(buf, ap, l.verifyReply[:])
	if n > 0 {
		// The sender's address is not verified: on Linux the answer
		// never waits for room in the socket (OpenSSL drops it
		// too), as no write there does (udpIO.writeTo).
		_, _ = l.io.writeTo(l.verifyReply[:n], nil, ap)
	}

	return t | acceptTagSet, accept
}

// Replacer is told by the listener of a new handshake from the address of
// its connection (Bastion patch (54), PacketConn.SetReplacer). Both
// methods run on the listener's read loop and must not block.
type Replacer interface {
	// NewHello reports whether datagram b, from the connection's address,
	// starts a handshake that replaces the connection once the client
	// has shown that it receives at that address (HelloVerify accepts
	// it).
	NewHello(b []byte) bool
	// EndForHello ends the connection, which the listener has just
	// taken off its address for the new handshake's connection.
	EndForHello()
}

// SetReplacer makes r decide about a datagram from this connection's
// address that starts a new handshake (Bastion patch (54),
// third_party/README.md): one r.NewHello reports true for is offered to
// ListenConfig.HelloVerify as if the address had no connection. Answered
// without a connection (no valid cookie), it is dropped and this
// connection goes on untouched; let through, this connection leaves the
// address, r.EndForHello runs, and a connection is made for the datagram
// as for any first one. A datagram routed by connection ID is never
// offered, nor any while the listener has no HelloVerify.
func (c *PacketConn) SetReplacer(r Replacer) {
	c.replacer.Store(r)
}

// helloAgain handles buf from ap, the address of old, which r.NewHello
// took for a new handshake (SetReplacer).
func (l *listener) helloAgain(old *PacketConn, r Replacer, buf []byte, ap netip.AddrPort) {
	tag, accept := l.verify(buf, ap)
	// The accept filter parses the whole datagram, where verify read its
	// first record: refused, no connection would be made for it (getConn),
	// so the old one keeps its address rather than end for none.
	if !accept || (l.acceptFilter != nil && !l.acceptFilter(buf)) || !l.leaveAddr(old) {
		return
	}
	// r.EndForHello closes old on the read loop, as its inline reader
	// may (PacketConn.Close must not wait for the read loop).
	l.inlineConn.Store(old)
	r.EndForHello()
	l.inlineConn.Store(nil)
	l.accept(buf, ap, tag)
}

// leaveAddr takes c off its remote address, so that the next connection
// made for that address gets its datagrams, unless the accept queue is
// full: then c keeps it (the client sends its ClientHello again), rather
// than end for a connection that getConn would not make. Only the read
// loop queues connections, so one that finds room here finds it in
// getConn too.
func (l *listener) leaveAddr(c *PacketConn) bool {
	l.connLock.Lock()
	defer l.connLock.Unlock()
	if len(l.acceptCh) == cap(l.acceptCh) {
		return false
	}
	if c.rmraddr.Load() == nil {
		if l.conns[c.raddrKey] == c {
			delete(l.conns, c.raddrKey)
		}
		l.forgetAddr(c)
		c.rmraddr.Store(true)
	}

	return true
}

// verifyReplyRoom is the room ListenConfig.HelloVerify has for its reply.
const verifyReplyRoom = 256

// acceptTagSet marks PacketConn.acceptTag as set; HelloVerify's tags
// are below it (a DTLS record sequence number has 48 bits).
const acceptTagSet = 1 << 63

// AcceptTag is the tag ListenConfig.HelloVerify gave the datagram this
// connection was made for, and whether it gave one (Bastion patch (51)).
func (c *PacketConn) AcceptTag() (uint64, bool) {
	t := c.acceptTag

	return t &^ acceptTagSet, t&acceptTagSet != 0
}

// route finds the existing connection that getConn would give buf from
// ap, the address to hand it with, and whether it was found by that
// address (not by connection ID); nil when getConn must decide.
func (l *listener) route(ap netip.AddrPort, buf []byte) (*PacketConn, net.Addr, bool) {
	l.connLock.Lock()
	defer l.connLock.Unlock()
	if l.datagramRouter != nil {
		if id, ok := l.datagramRouter(buf); ok {
			if conn, ok := l.conns[id]; ok {
				if ap == conn.raddrAP {
					return conn, conn.raddr, false
				}

				return conn, net.UDPAddrFromAddrPort(ap), false
			}
		}
	}
	if conn, ok := l.byAddr[ap]; ok {
		return conn, conn.raddr, true
	}

	return nil, nil, false
}

// getConn gets an existing connection or creates a new one.
// tag is the new connection's acceptTag (Bastion patch (51)).
func (l *listener) getConn(raddr net.Addr, buf []byte, tag uint64) (*PacketConn, bool, error) { //nolint:cyclop
	l.connLock.Lock()
	defer l.connLock.Unlock()
	// If we have a custom resolver, use it.
	if l.datagramRouter != nil {
		if id, ok := l.datagramRouter(buf); ok {
			if conn, ok := l.conns[id]; ok {
				return conn, true, nil
			}
		}
	}

	// If we don't have a custom resolver, or we were unable to find an
	// associated connection, fall back to remote address.
	key := raddr.String() // Bastion patch (35): formatted once per connection
	conn, ok := l.conns[key]
	if !ok {
		if isAccepting, ok := l.accepting.Load().(bool); !isAccepting || !ok {
			return nil, false, ErrClosedListener
		}
		if l.acceptFilter != nil {
			if !l.acceptFilter(buf) {
				return nil, false, nil
			}
		}
		conn = l.newPacketConn(raddr, key)
		conn.acceptTag = tag
		l.connWG.Add(1)
		select {
		case l.acceptCh <- conn:
			l.conns[key] = conn
			if conn.raddrAP.IsValid() {
				l.byAddr[conn.raddrAP] = conn
			}
		default:
			l.connWG.Done()

			return nil, false, ErrListenQueueExceeded
		}
	}

	return conn, true, nil
}

// PacketConn is a net.PacketConn implementation that is able to dictate its
// routing ID via an alternate identifier from its remote address. Internal
// buffering is performed for reads, and writes are passed through to the
// underlying net.PacketConn.
type PacketConn struct {
	listener *listener

	raddr   net.Addr
	raddrAP netip.AddrPort // raddr as read, if a UDP address (Bastion patch)
	rmraddr atomic.Value   // bool
	id      atomic.Value   // string

	// raddrKey is raddr.String(), conns' key for raddr (Bastion patch
	// (35)), formatted once, when the connection is made.
	raddrKey string

	buffer *idtlsnet.PacketBuffer

	doneCh   chan struct{}
	doneOnce sync.Once

	// writeDeadline is made by the first SetWriteDeadline or SetDeadline
	// that sets one (Bastion patch (41)): a listener's connection whose
	// deadline is never set, as for every DTLS connection, holds none.
	writeDeadline atomic.Pointer[deadline.Deadline]

	// inline, when set, is offered each datagram for this connection on
	// the listener's read loop (Bastion patch, see SetInlineReader).
	inline atomic.Pointer[func([]byte, net.Addr) bool]

	// onQueue, when set, is called on the read loop after each datagram
	// queued for ReadFrom (Bastion patch, see SetOnQueue).
	onQueue atomic.Pointer[func()]

	// acceptTag is HelloVerify's tag for the datagram this connection was
	// made for, with acceptTagSet (Bastion patch (51), see AcceptTag); set
	// before the connection is handed to Accept, never changed after.
	acceptTag uint64

	// replacer, a Replacer once set, is told of a new handshake from
	// this connection's address (Bastion patch (54), see SetReplacer).
	replacer atomic.Value
}

// SetOnQueue makes the listener's read loop call f after it has queued a
// datagram for this connection's ReadFrom (Bastion patch (22),
// third_party/README.md): a connection whose reader starts only when
// there is something to read starts it there. f runs on the read loop and
// must not block.
func (c *PacketConn) SetOnQueue(f func()) {
	c.onQueue.Store(&f)
}

// Queued reports whether a datagram is queued for ReadFrom.
func (c *PacketConn) Queued() bool {
	return !c.buffer.Empty()
}

// SetInlineReader makes the listener's read loop offer each datagram for
// this connection to f, on the read loop itself, when no datagram is
// queued for ReadFrom before it (Bastion patch, third_party/README.md). f
// returns false to leave the datagram to ReadFrom (it is queued, as
// without f); true when it has taken it. b is the listener's read buffer,
// valid only until f returns, and f may change it. While f runs the
// listener reads no datagram for any connection, so f must not block; it
// may write and close this connection.
func (c *PacketConn) SetInlineReader(f func(b []byte, raddr net.Addr) bool) {
	c.inline.Store(&f)
}

// newPacketConn constructs a new PacketConn.
func (l *listener) newPacketConn(raddr net.Addr, key string) *PacketConn {
	var ap netip.AddrPort
	if u, ok := raddr.(*net.UDPAddr); ok {
		ap = udpAddrPort(u)
	}

	return &PacketConn{
		listener: l,
		raddr:    raddr,
		raddrAP:  ap,
		raddrKey: key,
		buffer:   idtlsnet.NewBoundedPacketBuffer(queueMaxPackets, queueMaxBytes),
		doneCh:   make(chan struct{}),
	}
}

// ReadFrom reads a single packet payload and its associated remote address from
// the underlying buffer.
func (c *PacketConn) ReadFrom(buff []byte) (int, net.Addr, error) {
	return c.buffer.ReadFrom(buff)
}

// ReadFromContext is ReadFrom that also ends, with ctx.Err(), when ctx
// ends, as netctx's ReadFromContext does, without registering a watch of
// ctx for every wait (Bastion patch, third_party/README.md).
func (c *PacketConn) ReadFromContext(ctx context.Context, buff []byte) (int, net.Addr, error) {
	n, addr, err := c.buffer.ReadFromDone(buff, ctx.Done())
	if e := ctx.Err(); e != nil && n == 0 {
		err = e
	}

	return n, addr, err
}

// WriteTo writes len(payload) bytes from payload to the specified address.
func (c *PacketConn) WriteTo(payload []byte, addr net.Addr) (n int, err error) {
	// If we have a connection identifier, check to see if the outgoing packet
	// sets it.
	if c.listener.connIdentifier != nil {
		id := c.id.Load()
		// Only update establish identifier if we haven't already done so.
		if id == nil {
			candidate, ok := c.listener.connIdentifier(payload)
			// If we have an identifier, add entry to connection map.
			if ok {
				c.listener.connLock.Lock()
				c.listener.conns[candidate] = c
				c.listener.connLock.Unlock()
				c.id.Store(candidate)
			}
		}
		// If we are writing to a remote address that differs from the initial,
		// we have an alternate identifier established, and we haven't already
		// freed the remote address, free the remote address to be used by
		// another connection.
		// Note: this strategy results in holding onto a remote address after it
		// is potentially no longer in use by the client. However, releasing
		// earlier means that we could miss some packets that should have been
		// routed to this connection. Ideally, we would drop the connection
		// entry for the remote address as soon as the client starts sending
		// using an alternate identifier, but in practice this proves
		// challenging because any client could spoof a connection identifier,
		// resulting in the remote address entry being dropped prior to the
		// "real" client transitioning to sending using the alternate
		// identifier.
		if id != nil && c.rmraddr.Load() == nil && !sameAddr(addr, c.raddr) {
			c.listener.connLock.Lock()
			delete(c.listener.conns, c.raddrKey)
			c.listener.forgetAddr(c)
			c.rmraddr.Store(true)
			c.listener.connLock.Unlock()
		}
	}

	if d := c.writeDeadline.Load(); d != nil {
		select {
		case <-d.Done():
			return 0, context.DeadlineExceeded
		default:
		}
	}

	// Bastion patch: written through the listener's udpIO; the
	// connection's own address is already an AddrPort.
	ap := c.raddrAP
	if addr != c.raddr {
		ap = netip.AddrPort{}
		if u, ok := addr.(*net.UDPAddr); ok {
			ap = udpAddrPort(u)
		}
	}

	return c.listener.io.writeTo(payload, addr, ap)
}

// Close closes the conn and releases any Read calls.
func (c *PacketConn) Close() error {
	var err error
	c.doneOnce.Do(func() {
		c.listener.connWG.Done()
		close(c.doneCh)
		c.listener.connLock.Lock()
		// If we have an alternate identifier, remove it from the connection
		// map.
		if id := c.id.Load(); id != nil {
			delete(c.listener.conns, id.(string)) //nolint:forcetypeassert
		}
		// If we haven't already removed the remote address, remove it from the
		// connection map.
		if c.rmraddr.Load() == nil {
			delete(c.listener.conns, c.raddrKey)
			c.listener.forgetAddr(c)
			c.rmraddr.Store(true)
		}
		nConns := len(c.listener.conns)
		c.listener.connLock.Unlock()

		// Bastion patch: a Close from this connection's inline reader runs
		// on the read loop, which cannot end under it: no wait there (the
		// socket's close error is not reported to that Close).
		onReadLoop := c.listener.inlineConn.Load() == c
		if isAccepting, ok := c.listener.accepting.Load().(bool); nConns == 0 && !isAccepting && ok && !onReadLoop {
			// Wait if this is the final connection
			c.listener.readWG.Wait()
			if errClose, ok := c.listener.errClose.Load().(error); ok {
				err = errClose
			}
		} else {
			err = nil
		}

		if errBuf := c.buffer.Close(); errBuf != nil && err == nil {
			err = errBuf
		}
	})

	return err
}

// LocalAddr implements net.PacketConn.LocalAddr.
func (c *PacketConn) LocalAddr() net.Addr {
	return c.listener.pConn.LocalAddr()
}

// SetDeadline implements net.PacketConn.SetDeadline.
func (c *PacketConn) SetDeadline(t time.Time) error {
	c.setWriteDeadline(t)

	return c.SetReadDeadline(t)
}

// SetReadDeadline implements net.PacketConn.SetReadDeadline.
func (c *PacketConn) SetReadDeadline(t time.Time) error {
	return c.buffer.SetReadDeadline(t)
}

// SetWriteDeadline implements net.PacketConn.SetWriteDeadline.
func (c *PacketConn) SetWriteDeadline(t time.Time) error {
	c.setWriteDeadline(t)
	// Write deadline of underlying connection should not be changed
	// since the connection can be shared.
	return nil
}

// setWriteDeadline sets the write deadline, making it first unless t is
// zero: no deadline is what a deadline never set means (Bastion patch
// (41)).
func (c *PacketConn) setWriteDeadline(t time.Time) {
	d := c.writeDeadline.Load()
	if d == nil {
		if t.IsZero() {
			return
		}
		c.writeDeadline.CompareAndSwap(nil, deadline.New())
		d = c.writeDeadline.Load()
	}
	d.Set(t)
}

// forgetAddr removes c from byAddr, as its address is removed from
// conns; connLock is held.
func (l *listener) forgetAddr(c *PacketConn) {
	if l.byAddr[c.raddrAP] == c {
		delete(l.byAddr, c.raddrAP)
	}
}

// udpAddrPort is the address ReadFromUDPAddrPort returns for a datagram
// from u (ReadFrom's *net.UDPAddr for it): a 4-byte IP is IPv4, a
// 16-byte one (from an IPv6 socket) is kept as it is, IPv4-mapped too.
func udpAddrPort(u *net.UDPAddr) netip.AddrPort {
	var a netip.Addr
	switch len(u.IP) {
	case net.IPv4len:
		a = netip.AddrFrom4([4]byte(u.IP))
	case net.IPv6len:
		a = netip.AddrFrom16([16]byte(u.IP)).WithZone(u.Zone)
	default:
		return netip.AddrPort{}
	}

	return netip.AddrPortFrom(a, uint16(u.Port)) //nolint:gosec // G115, a port
}

// sameAddr is a.String() == b.String() without formatting two strings
// for every datagram written (Bastion patch, third_party/README.md).
func sameAddr(a, b net.Addr) bool {
	ua, ok1 := a.(*net.UDPAddr)
	ub, ok2 := b.(*net.UDPAddr)
	if ok1 && ok2 {
		return ua.Port == ub.Port && ua.Zone == ub.Zone && ua.IP.Equal(ub.IP)
	}

	return a.String() == b.String()
}

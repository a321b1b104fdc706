// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package netctx

import (
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// ReaderFrom is an interface for context controlled packet reader.
type ReaderFrom interface {
	ReadFromContext(context.Context, []byte) (int, net.Addr, error)
}

// WriterTo is an interface for context controlled packet writer.
type WriterTo interface {
	WriteToContext(context.Context, []byte, net.Addr) (int, error)
}

// PacketConn is a wrapper of net.PacketConn using context.Context.
type PacketConn interface {
	ReaderFrom
	WriterTo
	io.Closer
	LocalAddr() net.Addr
	Conn() net.PacketConn
}

type packetConn struct {
	nextConn  net.PacketConn
	closed    chan struct{}
	closeOnce sync.Once
	readMu    sync.Mutex
	writeMu   sync.Mutex

	readWatch, writeWatch watcher // Bastion patch: reused per direction
}

// NewPacketConn creates a new PacketConn wrapping the given net.PacketConn.
func NewPacketConn(pconn net.PacketConn) PacketConn {
	p := &packetConn{
		nextConn: pconn,
		closed:   make(chan struct{}),
	}

	return p
}

// ReadFromContext reads a packet from the connection,
// copying the payload into p. It returns the number of
// bytes copied into p and the return address that
// was on the packet.
// It returns the number of bytes read (0 <= n <= len(p))
// and any error encountered. Callers should always process
// the n > 0 bytes returned before considering the error err.
// Unlike net.PacketConn.ReadFrom(), the provided context is
// used to control timeout.
func (p *packetConn) ReadFromContext(ctx context.Context, b []byte) (int, net.Addr, error) {
	p.readMu.Lock()
	defer p.readMu.Unlock()

	select {
	case <-p.closed:
		return 0, nil, net.ErrClosed
	default:
	}

	// Bastion patch (third_party/README.md): the context is watched with
	// context.AfterFunc instead of a goroutine started and joined per call.
	// For a context of the context package nothing runs unless it ends.
	w := watch(ctx, p.nextConn, false, &p.readWatch)
	n, raddr, err := p.nextConn.ReadFrom(b)
	errSetDeadline := w.stop()
	if e := ctx.Err(); e != nil && n == 0 {
		err = e
	}
	if err == nil && errSetDeadline != nil {
		err = errSetDeadline
	}

	return n, raddr, err
}

// WriteToContext writes a packet with payload p to addr.
// Unlike net.PacketConn.WriteTo(), the provided context
// is used to control timeout.
// On packet-oriented connections, write timeouts are rare.
func (p *packetConn) WriteToContext(ctx context.Context, b []byte, raddr net.Addr) (int, error) {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()

	select {
	case <-p.closed:
		return 0, ErrClosing
	default:
	}

	w := watch(ctx, p.nextConn, true, &p.writeWatch)
	n, err := p.nextConn.WriteTo(b, raddr)
	errSetDeadline := w.stop()
	if e := ctx.Err(); e != nil && n == 0 {
		err = e
	}
	if err == nil && errSetDeadline != nil {
		err = errSetDeadline
	}

	return n, err
}

// watcher ends a blocked call when its context ends, by moving the deadline
// into the past (Bastion patch). One per direction, reused: calls in one
// direction are serialised by the connection's mutex. It holds the
// connection and the direction rather than a method value, which would be
// a new closure per call.
type watcher struct {
	pc      net.PacketConn
	write   bool
	fired   chan error // the deadline function's result, once it has run
	stopf   func() bool
	expireF func() // w.expire, made once
}

func (w *watcher) setDeadline(t time.Time) error {
	if w.write {
		return w.pc.SetWriteDeadline(t)
	}

	return w.pc.SetReadDeadline(t)
}

func (w *watcher) expire() {
	w.fired <- w.setDeadline(veryOld)
}

// watch arranges for the read (or write) deadline of pc to be set to
// veryOld if ctx ends before stop. It returns nil when ctx can never end.
func watch(ctx context.Context, pc net.PacketConn, write bool, w *watcher) *watcher {
	if ctx.Done() == nil {
		return nil
	}
	if w.fired == nil {
		w.fired = make(chan error, 1)
		w.expireF = w.expire
	}
	w.pc, w.write = pc, write
	w.stopf = context.AfterFunc(ctx, w.expireF)

	return w
}

// stop ends the watch. If the deadline was moved, it waits for that and
// clears it again (the next call starts without a deadline, as before), and
// returns the first error of either.
func (w *watcher) stop() error {
	if w == nil {
		return nil
	}
	defer func() { w.stopf = nil }()
	if w.stopf() {
		return nil
	}
	err := <-w.fired
	if err2 := w.setDeadline(time.Time{}); err == nil {
		err = err2
	}

	return err
}

// Close closes the connection.
// Any blocked ReadFromContext or WriteToContext operations will be unblocked
// and return errors.
func (p *packetConn) Close() error {
	err := p.nextConn.Close()
	p.closeOnce.Do(func() {
		p.writeMu.Lock()
		p.readMu.Lock()
		close(p.closed)
		p.readMu.Unlock()
		p.writeMu.Unlock()
	})

	return err
}

// LocalAddr returns the local network address, if known.
func (p *packetConn) LocalAddr() net.Addr {
	return p.nextConn.LocalAddr()
}

// Conn returns the underlying net.PacketConn.
func (p *packetConn) Conn() net.PacketConn {
	return p.nextConn
}

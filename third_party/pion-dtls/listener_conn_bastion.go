// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"context"
	"net"
	"sync"

	"github.com/pion/dtls/v3/internal/net/udp"
	"github.com/pion/logging"
	"github.com/pion/transport/v5/netctx"
)

// listenerPacketConn is the netctx.PacketConn of a listener's connection
// (Bastion patch). netctx maps a context onto the connection's deadlines
// by registering a context.AfterFunc per call (an allocation and a
// deregistration for every record read or written). A listener's
// connection needs none of it: its reads wait on the listener's packet
// buffer, which selects on the context itself, and its writes go to the
// shared socket, on which a deadline was never applied (the listener's
// PacketConn.SetWriteDeadline only gates the start of WriteTo, where the
// context is checked here). Results and errors are netctx's: net.ErrClosed
// / netctx.ErrClosing after Close, ctx.Err() when the context has ended
// and nothing was transferred.
type listenerPacketConn struct {
	conn      *udp.PacketConn
	closed    chan struct{}
	closeOnce sync.Once
}

func newPacketConn(c net.PacketConn) netctx.PacketConn {
	if lc, ok := c.(*udp.PacketConn); ok {
		return &listenerPacketConn{conn: lc, closed: make(chan struct{})}
	}

	return netctx.NewPacketConn(c)
}

func (p *listenerPacketConn) ReadFromContext(ctx context.Context, b []byte) (int, net.Addr, error) {
	select {
	case <-p.closed:
		return 0, nil, net.ErrClosed
	default:
	}
	n, raddr, err := p.conn.ReadFromContext(ctx, b)
	if e := ctx.Err(); e != nil && n == 0 {
		err = e
	}

	return n, raddr, err
}

func (p *listenerPacketConn) WriteToContext(ctx context.Context, b []byte, raddr net.Addr) (int, error) {
	select {
	case <-p.closed:
		return 0, netctx.ErrClosing
	default:
	}
	// Bastion patch (45): ctx.Err, not a select on ctx.Done, whose first
	// call makes the context's channel (an allocation) only to look at it.
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	n, err := p.conn.WriteTo(b, raddr)
	if e := ctx.Err(); e != nil && n == 0 {
		err = e
	}

	return n, err
}

func (p *listenerPacketConn) Close() error {
	err := p.conn.Close()
	p.closeOnce.Do(func() { close(p.closed) })

	return err
}

func (p *listenerPacketConn) LocalAddr() net.Addr { return p.conn.LocalAddr() }

func (p *listenerPacketConn) Conn() net.PacketConn { return p.conn }

// traceEnabler is implemented by a logger that can tell whether its Tracef
// writes anything (Bastion patch).
type traceEnabler interface {
	TraceEnabled() bool
}

// logTraces reports whether l may write Tracef lines. The arguments of a
// Tracef call are boxed into interfaces, allocations made even when the
// logger drops the line, so the calls on the handshake's hot paths are
// skipped for a logger that says it does not trace. Any other logger is
// assumed to trace: nothing changes for it.
func logTraces(l logging.LeveledLogger) bool {
	if t, ok := l.(traceEnabler); ok {
		return t.TraceEnabled()
	}

	return true
}

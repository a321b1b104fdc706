package mqtt

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
)

// Per-session bounds of the PUBACK pipeline (see pipeConn).
const (
	// maxPipelined is how many QoS 1 messages of one session may be
	// admitted to the Sink and not yet durable; the session's next PUBLISH
	// is handled only once one of them is. It is above the receive maximum
	// (32) so that an MQTT 5 client never waits on it; it bounds MQTT 3.1.1
	// clients, which have no receive maximum.
	maxPipelined = 64
	// maxHeldBytes bounds what mochi wrote to one session that waits behind
	// the fsync (PUBACKs, and whatever follows them: commands, PINGRESP).
	// A write that would go beyond it waits until the held bytes are sent;
	// one write larger than the bound is held alone.
	maxHeldBytes = 32 << 10
)

// errSessionEnded is returned for writes and messages of a session whose
// connection is closed or being closed.
var errSessionEnded = fmt.Errorf("mqtt session ended: %w", net.ErrClosed)

// pipeConn is a device's TLS connection as mochi sees it. It lets a session
// go on reading while its QoS 1 messages wait for the durable queue's fsync
// (so that one device's messages in flight share a group commit): OnPublish
// admits a message and registers its durability channel (hold) instead of
// waiting for it, and from then on every byte mochi writes to the session
// (the message's PUBACK first, then anything after it: other PUBACKs,
// commands, PINGRESP) is held, in order, until every message registered
// before that write is durable; only then is it written. With nothing
// pending, writes go straight through.
//
// If a message is not made durable (the queue's write or fsync failed),
// the bytes held are discarded and the connection is closed: the device
// never sees a PUBACK for it and sends it again after reconnecting.
//
// The flusher goroutine exists only while messages are pending. The
// pipeline state does too until the session's first QoS 1 message; after
// that an ended one (≈ 0.3 KiB, its buffers cut back to small ones) is kept
// for the next, so that a device with one message in flight does not
// allocate it again for every message.
type pipeConn struct {
	*tls.Conn
	l *tlsListener

	mu     sync.Mutex
	p      *pipeline // nil while nothing is pending
	idle   *pipeline // an ended pipeline, for the next message
	closed bool
}

// Bounds of what an ended pipeline keeps for the next one.
const (
	keptWaits = 16
	keptHeld  = 1 << 10
)

// pipeline is a session's state while messages wait for the disk.
type pipeline struct {
	device string
	waits  []<-chan error // admitted, not yet known durable, oldest first
	enq    uint64         // messages registered since the pipeline started
	done   uint64         // of them known durable (a prefix)
	held   []byte         // bytes mochi wrote behind the barrier, in order
	runs   []heldRun      // how held splits by barrier
	cond   sync.Cond      // room in waits or held, or the end; L is the conn's mu
	stop   chan struct{}  // closed at the end: the flusher stops waiting
	err    error          // why the session ended; nil while it runs
}

// heldRun is a stretch of held bytes written when enq was barrier: they may
// be sent once done >= barrier.
type heldRun struct {
	n       int
	barrier uint64
}

// waitRoom blocks the session's read loop (it runs in OnPublish) while
// maxPipelined of its messages wait for the disk.
func (c *pipeConn) waitRoom() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.closed {
			return errSessionEnded
		}
		p := c.p
		if p == nil || len(p.waits) < maxPipelined {
			return nil
		}
		p.cond.Wait()
	}
}

// hold registers an admitted message: what mochi writes from now on waits
// until durable delivers nil (and every earlier message's did).
func (c *pipeConn) hold(device string, durable <-chan error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errSessionEnded
	}
	p := c.p
	if p == nil {
		if p = c.idle; p != nil {
			c.idle = nil
		} else {
			p = &pipeline{device: device, stop: make(chan struct{})}
			p.cond.L = &c.mu
		}
		c.p = p
		c.l.wg.Add(1)
		go c.flush(p)
	}
	p.waits = append(p.waits, durable)
	p.enq++
	return nil
}

// Write sends b at once if no message of the session is waiting for the
// disk, else holds it behind them. mochi serializes its writes per client.
func (c *pipeConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.closed {
			return 0, errSessionEnded
		}
		p := c.p
		if p == nil || (len(p.held) == 0 && p.done == p.enq) {
			return c.Conn.Write(b)
		}
		if len(p.held) == 0 || len(p.held)+len(b) <= maxHeldBytes {
			p.held = append(p.held, b...)
			if k := len(p.runs) - 1; k >= 0 && p.runs[k].barrier == p.enq {
				p.runs[k].n += len(b)
			} else {
				p.runs = append(p.runs, heldRun{n: len(b), barrier: p.enq})
			}
			return len(b), nil
		}
		p.cond.Wait()
	}
}

// Close closes the connection first (so a write blocked on a slow device
// returns), then drops what is held.
func (c *pipeConn) Close() error {
	err := c.Conn.Close()
	c.mu.Lock()
	if p := c.p; p != nil {
		c.shut(p, errSessionEnded)
	}
	c.closed = true
	c.mu.Unlock()
	return err
}

// shut ends the pipeline: held bytes are dropped unsent. Caller holds c.mu.
func (c *pipeConn) shut(p *pipeline, err error) {
	if p.err != nil {
		return
	}
	p.err = err
	close(p.stop)
	p.waits, p.held, p.runs = nil, nil, nil
	c.p, c.idle = nil, nil
	c.closed = true
	p.cond.Broadcast()
}

// flush is the pipeline's goroutine: it waits for the oldest pending
// message, takes every later one that is already durable (same group
// commit), writes the held bytes those allow, in order, and ends when
// nothing is pending.
func (c *pipeConn) flush(p *pipeline) {
	defer c.l.wg.Done()
	for {
		c.mu.Lock()
		if p.err != nil {
			c.mu.Unlock()
			return
		}
		if len(p.waits) == 0 {
			// done == enq: everything held was written. This goroutine
			// does not touch p after the unlock: the next hold may
			// start the next pipeline with it.
			c.p = nil
			p.cond.Broadcast()
			p.enq, p.done = 0, 0
			p.waits, p.runs = keep(p.waits, keptWaits), keep(p.runs, keptWaits)
			p.held = keep(p.held, keptHeld)
			c.idle = p
			c.mu.Unlock()
			return
		}
		first := p.waits[0]
		c.mu.Unlock()
		var err error
		select {
		case err = <-first:
		case <-p.stop:
			return
		}
		c.mu.Lock()
		if p.err != nil {
			c.mu.Unlock()
			return
		}
		n := 0
		if err == nil {
			n = 1
		ready:
			for n < len(p.waits) {
				select {
				case err = <-p.waits[n]:
					if err != nil {
						break ready
					}
					n++
				default:
					break ready
				}
			}
		}
		p.waits = p.waits[n:]
		p.done += uint64(n)
		k, size := 0, 0
		for k < len(p.runs) && p.runs[k].barrier <= p.done {
			size += p.runs[k].n
			k++
		}
		var werr error
		if size > 0 {
			// Written under mu so that a direct Write cannot overtake it.
			_, werr = c.Conn.Write(p.held[:size])
			p.held = append(p.held[:0], p.held[size:]...)
			p.runs = append(p.runs[:0], p.runs[k:]...)
		}
		p.cond.Broadcast()
		c.mu.Unlock()
		switch {
		case err != nil:
			c.fail(p, err, true)
			return
		case werr != nil:
			c.fail(p, werr, false)
			return
		}
	}
}

// keep returns s emptied, or nil if its array is larger than max.
func keep[T any](s []T, max int) []T {
	if cap(s) > max {
		return nil
	}
	clear(s[:cap(s)]) // no channels kept alive
	return s[:0]
}

// fail ends the session: a message that is not durable must never be
// acknowledged, so nothing held is sent and the device will send it again
// after reconnecting.
func (c *pipeConn) fail(p *pipeline, err error, durability bool) {
	c.mu.Lock()
	ended := p.err != nil
	c.shut(p, err)
	c.mu.Unlock()
	if ended {
		return
	}
	if durability && !errors.Is(err, net.ErrClosed) {
		c.l.s.log.Error("mqtt: a message was not made durable; closing the session without acknowledging it (the device sends it again after reconnecting)",
			"device", p.device, "err", err)
	} else {
		c.l.s.log.Debug("mqtt: write to device failed", "device", p.device, "err", err)
	}
	c.Conn.Close()
}

package mqtt

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"

	"github.com/bastion-iot/bastion/bridges/hub"
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
	// keptHeld bounds the held buffer a session keeps between bursts.
	keptHeld = 1 << 10
	// deadlineSlack is how much later than asked a deadline may be set, so
	// that mochi's per-packet keepalive deadline (now + 1.5 × keepalive,
	// set before every packet read) changes the connection's timers at
	// most once per deadlineSlack instead of once per packet.
	deadlineSlack = 100 * time.Millisecond
	// endWait bounds how long ending a session (revoked, taken over,
	// shutdown) waits to send its DISCONNECT before it closes the
	// connection: a device that reads gets it at once, one that does not
	// must not hold up whoever ends the session.
	endWait = 50 * time.Millisecond
)

// errSessionEnded is returned for writes and messages of a session whose
// connection is closed or being closed.
var errSessionEnded = fmt.Errorf("mqtt session ended: %w", net.ErrClosed)

// pipeConn is a device's TLS connection as mochi sees it. It lets a session
// go on reading while its QoS 1 messages wait for the durable queue's fsync
// (so that one device's messages in flight share a group commit): OnPublish
// registers a message (reserve) and admits it to the Sink with the
// session's durability callback (report) instead of waiting for it, and
// from then on every byte mochi writes to the session (the message's PUBACK
// first, then anything after it: other PUBACKs, commands, PINGRESP) is held,
// in order, until every message registered before that write is durable;
// only then is it written. With nothing pending, writes go straight through.
//
// The Sink calls report on its own goroutine after the fsync, in order,
// and report never blocks: it counts the message and, unless one already
// runs, starts the session's flusher goroutine, which writes what the
// durable messages allow and ends when it has caught up. So a session
// costs one goroutine start per group commit that covers it, and nothing
// while no message waits: no goroutine is parked per session or per
// message. (report does not write to the device itself: crypto/tls holds
// its write lock across a blocking write, and the session's reader can
// write too (a TLS 1.3 KeyUpdate reply), so a device that stops reading
// could stall the queue's writer, and with it every device.)
//
// If a message is not made durable (the queue's write or fsync failed),
// the bytes held are discarded and the connection is closed: the device
// never sees a PUBACK for it and sends it again after reconnecting. Each
// such message is counted as refused (report, hub.NotDurable).
type pipeConn struct {
	*tls.Conn
	l *tlsListener
	// report is reported as a func value, made once per connection so
	// that admitting a message allocates nothing for it; flushFn is flush,
	// likewise, so that starting the flusher allocates no closure.
	report  func(error)
	flushFn func()
	// deadline is the read deadline last set on the connection (Unix ns;
	// 0: none), see SetDeadline.
	deadline atomic.Int64
	// wdl is the write deadline last set (Unix ns), see armWrite; under mu.
	wdl int64
	// cl is the connection's mochi client, set when its CONNECT's
	// credential check starts (Server.register); seq (the order of
	// registration), accepted (its credentials were good: a session of the
	// device, maybe not yet in mochi's Clients) and revokedInCheck (its
	// device was revoked while they were being checked) are under
	// Server.mu.
	cl             *mochi.Client
	seq            uint64
	accepted       bool
	revokedInCheck bool
	// cert is the certificate the session was authenticated with (nil:
	// a secret login), set under Server.mu with accepted and only read
	// after: the sweep ends the session with it (certsweep.go).
	cert *hub.SessionCert
	// connacked is set once the session's CONNACK was sent: a DISCONNECT
	// may be sent from then on.
	connacked atomic.Bool
	// refused is set when the session is closed because its device is no
	// longer accepted (revoked) or its certificate ended (certsweep.go):
	// its Will is not sent.
	refused atomic.Bool
	// unauth is the connection's slot among the listener's
	// unauthenticated ones until Server.accept (SourceLimit.Claim) or
	// authenticated releases it.
	unauth *unauthSlot
	// hdr holds the fixed header of the connection's first packet, which
	// the listener read to check its size (tlsListener.firstPacketFits);
	// first is what of it mochi has not read yet (Read). Only the
	// session's reader touches them.
	hdr   [maxFixedHeader]byte
	first []byte

	mu     sync.Mutex
	cond   sync.Cond // L is mu: room in the pipeline or in held, or the end
	closed bool
	device string
	enq    uint64    // messages registered (reserve) over the session
	done   uint64    // of them durable with their held bytes sent (a prefix)
	held   []byte    // bytes mochi wrote behind the barrier, in order
	runs   []heldRun // how held splits by barrier

	// Set by report (the Sink's goroutine) and read by the flusher. Never
	// held across I/O or together with mu except mu -> nmu in shut.
	nmu sync.Mutex
	// durable is how many messages, in the order registered, are settled
	// (a prefix): each made durable (report) or settled without the Sink
	// (unreserve: refused, withheld). A message settled at once does not
	// make the ones before it durable: it counts only once every earlier
	// message has been reported, or its PUBACK could overtake theirs and
	// acknowledge a message still waiting for its fsync. Until then it is
	// in ahead (ascending, all above durable+1; nil but after a refusal
	// behind waiting messages, so an idle session keeps nothing).
	durable uint64
	ahead   []uint64
	failed  error // the first failure reported; nothing counts after it
	running bool  // a flusher goroutine is started and not finished
	ended   bool  // the session ended: no flusher starts any more
	// rdev is the session's device (identify), for report's count of a
	// message not made durable: report may not take mu.
	rdev string
}

// heldRun is a stretch of held bytes written when enq was barrier: they may
// be sent once done >= barrier.
type heldRun struct {
	n       int
	barrier uint64
}

// authenticated gives back the connection's slot among the listener's
// unauthenticated ones (tlsListener.admit) when the session ends before
// its CONNECT was accepted (Server.accept gives it back then: claim).
func (c *pipeConn) authenticated() {
	if c.unauth != nil {
		c.l.limit.Release(c.unauth)
	}
}

// Read hands mochi the first packet's fixed header the listener read
// (first), then reads the connection.
func (c *pipeConn) Read(b []byte) (int, error) {
	if len(c.first) > 0 {
		n := copy(b, c.first)
		c.first = c.first[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// identify names the session's device for its log lines.
func (c *pipeConn) identify(device string) {
	c.mu.Lock()
	c.device = device
	c.mu.Unlock()
	c.nmu.Lock()
	c.rdev = device
	c.nmu.Unlock()
}

func newPipeConn(tc *tls.Conn, l *tlsListener) *pipeConn {
	c := &pipeConn{Conn: tc, l: l}
	c.cond.L = &c.mu
	c.report, c.flushFn = c.reported, c.flush
	return c
}

// reserve registers the session's next QoS 1 message, waiting (the
// session's read loop runs OnPublish) while maxPipelined of its messages
// wait for the disk. What mochi writes from now on is held until the
// message is reported durable; the caller admits it with c.report, or
// calls unreserve if the Sink did not take the callback.
func (c *pipeConn) reserve(device string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if c.closed {
			return errSessionEnded
		}
		if c.enq-c.done < maxPipelined {
			break
		}
		c.cond.Wait()
	}
	c.device = device
	c.enq++
	return nil
}

// unreserve is for a reserved message the Sink will not report (refused,
// or accepted without a wait): it takes back the reservation if nothing
// can depend on it, else the message counts as settled once every message
// before it has (settle), so that its PUBACK, a refusal's negative one
// included, goes out after theirs and never before their fsync.
func (c *pipeConn) unreserve() {
	c.mu.Lock()
	if c.done == c.enq-1 && len(c.held) == 0 {
		c.enq--
		c.mu.Unlock()
		return
	}
	last := c.enq // the session's read loop registers the next only after this
	c.mu.Unlock()
	c.settleNow(last)
}

// reported is report: the Sink's outcome for the oldest registered message
// it has not reported yet (the Sink reports in order). It never blocks.
func (c *pipeConn) reported(err error) { c.settle(err, 0) }

// settleNow settles message n, registered last, without the Sink.
func (c *pipeConn) settleNow(n uint64) { c.settle(nil, n) }

// settle records an outcome and starts the flusher if none runs. It never
// blocks. now == 0: the Sink's report, for message durable+1 (every
// message up to durable is settled and none in ahead is durable+1, so the
// oldest the Sink has not reported is that one: the session's read loop
// settles a message the Sink did not take before it registers the next).
// Otherwise message now, the last the read loop registered, settled
// without the Sink: it counts at once if every message before it has, else
// once they have.
func (c *pipeConn) settle(err error, now uint64) {
	c.nmu.Lock()
	device := c.rdev
	switch {
	case c.failed != nil:
	case err != nil:
		c.failed = err
	case now != 0 && c.durable+1 != now:
		c.ahead = append(c.ahead, now)
	default:
		c.durable++
		for len(c.ahead) > 0 && c.ahead[0] == c.durable+1 {
			c.durable++
			c.ahead = c.ahead[1:]
		}
		if len(c.ahead) == 0 {
			c.ahead = nil
		}
	}
	start := !c.running && !c.ended
	if start {
		c.running = true
		// The session's goroutine (handle) holds a count of l.wg until
		// the connection is closed, and closing sets ended first: this
		// Add never races with l.wg.Wait from zero.
		c.l.wg.Add(1)
	}
	c.nmu.Unlock()
	if err != nil {
		// The hub counted the message as accepted when the Sink admitted
		// it; it is never acknowledged now (the session closes, the device
		// sends it again). Counted here, per message the Sink failed,
		// including those reported after the first failure or after the
		// session ended: each is reported exactly once.
		c.l.s.hub.NotDurable(hub.MQTT, device, err)
	}
	if start {
		go c.flushFn()
	}
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
		if c.done == c.enq && len(c.held) == 0 {
			n, err := c.writeLocked(b)
			if err != nil {
				c.writeFailed(c.device, err)
			}
			return n, err
		}
		if len(c.held) == 0 || len(c.held)+len(b) <= maxHeldBytes {
			c.held = append(c.held, b...)
			if k := len(c.runs) - 1; k >= 0 && c.runs[k].barrier == c.enq {
				c.runs[k].n += len(b)
			} else {
				c.runs = append(c.runs, heldRun{n: len(b), barrier: c.enq})
			}
			return len(b), nil
		}
		c.cond.Wait()
	}
}

// SetDeadline sets the connection's read deadline to t, or keeps the one
// set if that is not earlier than t and at most deadlineSlack later: a
// session never times out earlier than asked, and up to deadlineSlack
// later. mochi calls it (refreshDeadline) before every packet it reads,
// and each call resets a runtime timer. Writes have their own deadline
// (armWrite): a packet read must not extend a write that is blocked.
func (c *pipeConn) SetDeadline(t time.Time) error {
	if t.IsZero() {
		c.deadline.Store(0)
		return c.Conn.SetReadDeadline(t)
	}
	if cur, n := c.deadline.Load(), t.UnixNano(); cur != 0 && n <= cur && n >= cur-int64(deadlineSlack) {
		return nil
	}
	t = t.Add(deadlineSlack)
	c.deadline.Store(t.UnixNano())
	// The write deadline is set only when a write starts (armWrite), so
	// after WriteTimeout without one it has passed; but crypto/tls also
	// writes by itself while reading (its answer to a TLS 1.3 KeyUpdate
	// that asks for one), and such a write would fail at once and break
	// the connection for the next PUBACK. So it is kept ahead here as
	// well, once per deadlineSlack at most, and only while no write holds
	// mu: a write that is blocked on the device must not be extended.
	if c.l != nil && c.mu.TryLock() { // l is nil only in unit tests of the deadline alone
		if timeout := c.l.s.cfg.WriteTimeout; c.wdl < time.Now().Add(timeout/2).UnixNano() {
			c.armWrite()
		}
		c.mu.Unlock()
	}
	return c.Conn.SetReadDeadline(t)
}

// writeChunk is the most written to the device under one write deadline:
// a TLS record's worth, so that a device that reads slowly but steadily
// (a command of 256 KiB over a link of a few kbit/s) gets WriteTimeout
// for each chunk rather than for the whole write.
const writeChunk = 16 << 10

// writeLocked writes b to the device, each writeChunk under a deadline of
// its own (armWrite). Caller holds mu.
func (c *pipeConn) writeLocked(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		k := min(len(b), writeChunk)
		c.armWrite()
		w, err := c.Conn.Write(b[:k])
		n += w
		if err != nil {
			return n, err
		}
		b = b[k:]
	}
	return n, nil
}

// armWrite gives the write about to start Config.WriteTimeout, less up to
// a thirtieth of it, so that the timer is reset at most that often. Caller
// holds mu, under which every write to the device is made.
func (c *pipeConn) armWrite() {
	timeout := c.l.s.cfg.WriteTimeout
	now := time.Now()
	if c.wdl >= now.Add(timeout-timeout/30).UnixNano() {
		return
	}
	t := now.Add(timeout)
	c.wdl = t.UnixNano()
	c.Conn.SetWriteDeadline(t)
}

// writeFailed ends the session after a failed write: crypto/tls fails
// every write after one that failed, and mochi's writer would only log
// it while the session went on reading. The TCP connection is closed
// under the TLS layer: a close_notify would wait for the device too.
// Caller holds mu.
func (c *pipeConn) writeFailed(device string, err error) {
	if c.closed {
		return
	}
	c.shut()
	c.Conn.NetConn().Close()
	if isTimeout(err) {
		c.l.s.log.Warn("mqtt: closing session: the device has not read what the gateway sent it; it must keep reading its connection",
			"device", device, "write_timeout", c.l.s.cfg.WriteTimeout)
	} else {
		c.l.s.log.Debug("mqtt: write to device failed", "device", device, "err", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// end closes the session's connection without waiting on the device:
// pk (a DISCONNECT, or nil) is written if nothing is held before it and
// it can be by deadline, then the TCP connection is closed under the TLS
// layer (no close_notify, which could wait for a full buffer too), so a
// write blocked on the device returns at once. Held bytes are dropped.
// mochi's own DisconnectClient wrote its DISCONNECT under the session's
// lock, behind any write blocked on the device.
func (c *pipeConn) end(pk []byte, deadline time.Time) {
	raw := c.Conn.NetConn()
	if pk != nil {
		// Whatever holds mu (a write to the device) or the TLS write lock
		// returns once the connection is closed.
		t := time.AfterFunc(time.Until(deadline), func() { raw.Close() })
		c.mu.Lock()
		if !c.closed && c.done == c.enq && len(c.held) == 0 {
			c.Conn.SetWriteDeadline(deadline)
			c.Conn.Write(pk)
		}
		c.shut()
		c.mu.Unlock()
		t.Stop()
	}
	raw.Close()
	c.mu.Lock()
	c.shut()
	c.mu.Unlock()
}

// Close closes the connection first (so a write blocked on a slow device
// returns), then drops what is held.
func (c *pipeConn) Close() error {
	err := c.Conn.Close()
	c.mu.Lock()
	c.shut()
	c.mu.Unlock()
	return err
}

// shut ends the pipeline: held bytes are dropped unsent and no flusher
// starts any more. Caller holds c.mu.
func (c *pipeConn) shut() {
	if c.closed {
		return
	}
	c.closed = true
	c.held, c.runs = nil, nil
	c.cond.Broadcast()
	c.nmu.Lock()
	c.ended = true
	c.nmu.Unlock()
}

// flush is the flusher goroutine: it writes the held bytes that the
// messages reported durable allow, in order, until it has caught up with
// the reports; a failure reported ends the session.
func (c *pipeConn) flush() {
	defer c.l.wg.Done()
	for {
		c.nmu.Lock()
		durable, failed := c.durable, c.failed
		c.nmu.Unlock()

		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			c.stopped()
			return
		}
		var werr error
		if durable > c.done {
			c.done = durable
			k, size := 0, 0
			for k < len(c.runs) && c.runs[k].barrier <= c.done {
				size += c.runs[k].n
				k++
			}
			if size > 0 {
				// Written under mu so that a direct Write cannot overtake it.
				_, werr = c.writeLocked(c.held[:size])
				c.held = append(c.held[:0], c.held[size:]...)
				c.runs = append(c.runs[:0], c.runs[k:]...)
				if len(c.held) == 0 && cap(c.held) > keptHeld {
					c.held, c.runs = nil, nil
				}
			}
			c.cond.Broadcast()
		}
		device := c.device
		c.mu.Unlock()

		switch {
		case failed != nil:
			c.fail(device, failed)
			c.stopped()
			return
		case werr != nil:
			c.mu.Lock()
			c.writeFailed(device, werr)
			c.mu.Unlock()
			c.stopped()
			return
		}
		c.nmu.Lock()
		if c.durable == durable && c.failed == nil {
			c.running = false
			c.nmu.Unlock()
			return
		}
		c.nmu.Unlock()
	}
}

// stopped marks the flusher finished after the session ended.
func (c *pipeConn) stopped() {
	c.nmu.Lock()
	c.running = false
	c.nmu.Unlock()
}

// fail ends the session: a message that is not durable must never be
// acknowledged, so nothing held is sent and the device will send it again
// after reconnecting.
func (c *pipeConn) fail(device string, err error) {
	c.mu.Lock()
	ended := c.closed
	c.shut()
	c.mu.Unlock()
	if ended {
		return
	}
	if !errors.Is(err, net.ErrClosed) {
		c.l.s.log.Error("mqtt: a message was not made durable; closing the session without acknowledging it (the device sends it again after reconnecting)",
			"device", device, "reason", hub.SinkRefusal(err), "err", err)
	}
	c.Conn.Close()
}

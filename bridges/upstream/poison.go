package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/eclipse/paho.golang/packets"
)

// Some brokers answer a message they will never take not with a PUBACK
// reason (which park.go handles) but by closing the connection: AWS IoT
// Core does for a topic beyond its limits (256 bytes, 7 slashes), Mosquitto
// for a PUBLISH above its max_packet_size. The link resends the queue from
// its head on every connection, so such a message at the head is sent
// again, the connection drops again, and every device's messages behind it
// wait for ever. max_topic_length, max_topic_levels and the broker's
// Maximum Packet Size stop the cases the link can know of before sending;
// poisonWatch finds the others:
//
//   - A connection that the broker ends within poisonWindow of the link
//     writing a PUBLISH that the broker has not answered is suspect, if the
//     way it ends can be about a message: closed without a DISCONNECT, or a
//     DISCONNECT whose reason can be about one PUBLISH (publishReason). An
//     end of the link's own (no PINGRESP within the keepalive, a write
//     deadline, reload, shutdown), a network error, or a DISCONNECT about
//     the broker or the link (0x89 server busy, 0x97 quota exceeded, ...)
//     is not (connEnd.blame). With several PUBLISHes unanswered, which one
//     (if any) was the cause is unknown: the next connections send in slow
//     start (poisonWatch.probeTo), one PUBLISH alone first, then one more in
//     flight for each PUBACK, until the broker has answered past the last
//     one written before the end. Pipelining comes back within a few round
//     trips when nothing is wrong.
//   - A suspect end with one PUBLISH alone unanswered (alone in flight,
//     whether the slow start or the broker's Receive Maximum made it so)
//     names it; the same message named by poisonStrikes such ends in a row
//     is parked (reason connection_closed), and the messages behind it flow.
//     Ends that are not suspect neither count nor break the row. A message
//     the broker answered on a connection (a PUBACK for that message, a
//     refusal included) is one it takes: its count starts again. An answer
//     to a later message is not one to it: the sender skips a device
//     waiting behind a message it cannot park, and sends later messages of
//     other devices before it.
//
// A broker that closes connections for reasons of its own (it restarts
// without a DISCONNECT) rarely does so right after the same message three
// times in a row, with that message alone in flight; if it does, the message
// is parked, not lost, and the log and `bastionctl upstream parked` say why.
const (
	poisonWindow  = 10 * time.Second
	poisonStrikes = 3
)

// poisonWatch is the sender's state across connections (and generations).
// Only the sender's goroutine (sendLoop, pipeline) touches it.
type poisonWatch struct {
	// probeTo: until the broker answers a PUBLISH of this seq or later, the
	// sender is in slow start (window). 0: off.
	probeTo uint64
	suspect uint64 // the message alone unanswered when the last connection ended
	dev     string // its device
	strikes int    // connections in a row that ended so on suspect
}

// window is the number of PUBLISHes run r may have awaiting PUBACK, given
// the configured window w.
func (p *poisonWatch) window(r *sendRun, w int) int {
	if p.probeTo == 0 {
		return w
	}
	if r.ackedTo.Load() >= p.probeTo {
		p.probeTo = 0
		return w
	}
	return min(w, 1+int(r.acks.Load()))
}

// connectionEnded looks at how the connection that r was the last run on
// ended (not at shutdown or reload), and parks the message the broker keeps
// closing it on. Only an end that can be the message's doing counts
// (connEnd.blame): the broker closed the connection without a DISCONNECT,
// or with a reason about a PUBLISH. An end of our own (no PINGRESP within
// the keepalive, a write deadline, our DISCONNECT), a network error, or the
// broker's DISCONNECT for a reason about itself (0x89 server busy, 0x97
// quota exceeded, ...) says nothing about the message: it neither counts
// nor clears the count. A message the broker answered (a PUBACK for it, on
// any run of the connection) is not what it closes connections on: the
// count starts again.
func (u *Upstream) connectionEnded(r *sendRun) {
	p := &u.poison
	end := r.end()
	if p.suspect != 0 && r.conn.answeredKept(p.suspect) {
		// The broker answered the suspect on this connection, and it stayed
		// queued (refused, or held back); one it took is deleted. Answers
		// to higher seqs say nothing about it: its device may have waited
		// behind a message that could not be parked while other devices'
		// later messages were sent and answered.
		p.clear()
	}
	// This run's answers are to what it wrote, in the order it wrote them,
	// all at or below r.written: one at or above it answers r.written.
	if r.written == 0 || r.ackedTo.Load() >= r.written || r.conn.answeredKept(r.written) || time.Since(r.writtenAt) > poisonWindow {
		// Nothing unanswered (on this run, or on an earlier one of the
		// connection: a PUBACK 0x97, say, then resent: the broker takes it),
		// or not just sent: not a message's doing.
		p.clear()
		return
	}
	how, counts := end.blame(r.writtenWrite)
	if !counts {
		u.log.Debug("upstream: the connection ended right after a message without its PUBACK, but not by the message's doing; not counted against it", "device", r.writtenDev, "seq", r.written, "end", how)
		return
	}
	p.probeTo = max(p.probeTo, r.written)
	if !r.single {
		p.clear()
		u.log.Debug("upstream: the connection ended with PUBLISHes unanswered; sending in slow start to find out whether one of them is the cause", "up_to_seq", r.written, "end", how)
		return
	}
	if r.written != p.suspect {
		p.suspect, p.dev, p.strikes = r.written, r.writtenDev, 0
	}
	p.strikes++
	if p.strikes < poisonStrikes {
		u.log.Info("upstream: the broker closed the connection right after a message, without a PUBACK", "device", p.dev, "seq", p.suspect, "end", how, "times_in_a_row", p.strikes, "parked_at", poisonStrikes)
		return
	}
	why := fmt.Sprintf("the broker closed the connection %d times in a row within %s of receiving it, without a PUBACK (last: %s): it likely breaks a limit the broker enforces by disconnecting (topic length or levels, packet size, ACL); the broker's log says which (set upstream.max_topic_length or max_topic_levels for a topic limit), then retry", poisonStrikes, poisonWindow, how)
	if err := u.parkSeq(p.suspect, "connection_closed", why); err != nil {
		u.setError(fmt.Errorf("upstream broker %s: seq %d from %s: %s; it cannot be parked: %w; it stays at the head of the queue and every message behind it waits",
			u.cur.Load().cfg.Broker, p.suspect, p.dev, why, err))
		return
	}
	p.clear()
}

func (p *poisonWatch) clear() { p.suspect, p.dev, p.strikes = 0, "", 0 }

// endCause is who or what ended a connection.
type endCause uint8

const (
	endOpen         endCause = iota // not ended, or not known
	endOurs                         // the link closed it: no PINGRESP, a write deadline, reload, shutdown
	endNetwork                      // a read or write failed on a local network error (no route, TCP timeout)
	endBrokerClosed                 // the broker closed it (EOF, reset) without a DISCONNECT
	endDisconnect                   // the broker's DISCONNECT (connEnd.reason)
	endBrokerFault                  // the broker sent a packet the link does not read (packetConn.refuseRead): about the broker, not a message
)

// connEnd records how one connection ended, as it happens: packetConn
// (wire.go) the reads and writes that fail and its Close, linkSession
// (session.go) the broker's DISCONNECT. The first cause recorded wins: the
// broker's DISCONNECT, or the read that finds the connection closed, comes
// before paho closes it; our own close (paho's missing PINGRESP, a write
// deadline) comes before the read that fails because of it.
type connEnd struct {
	mu     sync.Mutex
	cause  endCause
	reason byte   // endDisconnect: the broker's reason code
	detail string // for the log
	// byWrite: cause is a failed write's guess (a reset or broken pipe
	// read as the broker closing), which the broker's DISCONNECT, read
	// after, replaces: a broker that sends DISCONNECT 0x89 and closes may
	// reset the connection under a write in flight before paho's reader
	// has read the DISCONNECT.
	byWrite bool
	// A SUBSCRIBE (or UNSUBSCRIBE) was unanswered when the connection
	// ended, the last one written in write number reqWrite: the broker may
	// have closed the connection on it (EMQX does, for an ACL denial with
	// deny_action disconnect), not on a PUBLISH written after it.
	reqPending bool
	reqWrite   uint64
	// kept: the seqs the broker answered on the connection, any run, that
	// stayed queued (refused, or held back behind a refusal: sendRun.hold),
	// which a later run of the connection sends again. What the broker
	// took is deleted from the queue and not sent again.
	kept map[uint64]struct{}

	writes atomic.Uint64 // writes on the connection so far (packetConn.write)
}

// endState is a copy of a connEnd once the connection is gone.
type endState struct {
	cause      endCause
	reason     byte
	detail     string
	reqPending bool
	reqWrite   uint64
}

func (e *connEnd) set(cause endCause, reason byte, detail string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cause == endOpen || e.byWrite && cause == endDisconnect {
		e.cause, e.reason, e.detail, e.byWrite = cause, reason, detail, false
	}
}

// setByWrite is set for a failed write's reading of the end (byWrite).
func (e *connEnd) setByWrite(cause endCause, detail string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cause == endOpen {
		e.cause, e.reason, e.detail, e.byWrite = cause, 0, detail, true
	}
}

// readFailed records a read that found the connection ended.
func (e *connEnd) readFailed(err error) {
	var oe *net.OpError
	switch {
	case errors.Is(err, net.ErrClosed):
		e.set(endOurs, 0, "closed by the link")
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		e.set(endBrokerClosed, 0, "the broker closed the connection without a DISCONNECT")
	case errors.As(err, &oe) && oe.Op == "remote error": // a TLS alert from the broker
		e.set(endBrokerClosed, 0, "the broker ended the connection with a TLS alert: "+err.Error())
	default:
		e.set(endNetwork, 0, "a network error: "+err.Error())
	}
}

// disconnected records the broker's DISCONNECT and whether a SUBSCRIBE or
// UNSUBSCRIBE of ours was unanswered when the connection ended (pd nil:
// ended otherwise).
func (e *connEnd) disconnected(pd *packets.Disconnect, reqPending bool) {
	if pd != nil {
		e.set(endDisconnect, pd.ReasonCode, fmt.Sprintf("the broker's DISCONNECT 0x%02x (%s)", pd.ReasonCode, disconnectReason(pd)))
	}
	if reqPending {
		e.mu.Lock()
		e.reqPending = true
		e.mu.Unlock()
	}
}

// requestWritten records that write number n carried a SUBSCRIBE or
// UNSUBSCRIBE.
func (e *connEnd) requestWritten(n uint64) {
	e.mu.Lock()
	e.reqWrite = n
	e.mu.Unlock()
}

// keep records that the broker answered seq and it stays queued (e nil:
// not a packetConn).
func (e *connEnd) keep(seq uint64) {
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.kept == nil {
		e.kept = map[uint64]struct{}{}
	}
	e.kept[seq] = struct{}{}
}

// answeredKept reports whether the broker answered seq on the connection
// and it stayed queued (keep).
func (e *connEnd) answeredKept(seq uint64) bool {
	if e == nil {
		return false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.kept[seq]
	return ok
}

// forgetBelow drops what keep recorded below head, the queue's head as a
// run starts: those are deleted (sent again and taken, or parked), and a
// connection that stays up through many refusals would otherwise collect
// them.
func (e *connEnd) forgetBelow(head uint64) {
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for seq := range e.kept {
		if seq < head {
			delete(e.kept, seq)
		}
	}
}

func (e *connEnd) state() endState {
	e.mu.Lock()
	defer e.mu.Unlock()
	return endState{cause: e.cause, reason: e.reason, detail: e.detail, reqPending: e.reqPending, reqWrite: e.reqWrite}
}

// blame says how the connection ended and whether that can be the doing of
// the PUBLISH written in write number w.
func (s endState) blame(w uint64) (how string, counts bool) {
	how = s.detail
	switch s.cause {
	case endBrokerClosed:
	case endDisconnect:
		if !publishReason(s.reason) {
			return how + ", a reason about the broker or the link, not one message", false
		}
	case endOpen:
		return "not known", false
	default: // endOurs, endNetwork, endBrokerFault
		return how, false
	}
	if s.reqPending && s.reqWrite < w {
		return how + ", with a SUBSCRIBE written before the message unanswered (the broker may have closed it on that)", false
	}
	return how, true
}

// publishReason reports whether a DISCONNECT reason code (MQTT v5
// §3.14.2.1) can be about one PUBLISH. The others are about the broker
// (0x80 unspecified, 0x83 implementation specific, 0x89 server busy, 0x8B
// shutting down, 0x9C/0x9D use another server), the session or the link as a
// whole (0x8D keepalive timeout, 0x8E session taken over, 0x93 receive
// maximum exceeded, 0x96 message rate too high, 0x97 quota exceeded, 0x98
// administrative action, 0x9F connection rate, 0xA0 maximum connect time),
// subscriptions (0x8F, 0x9E, 0xA1, 0xA2), or features the link uses for every
// message alike or not at all (0x94 topic alias, 0x9A retain, 0x9B QoS).
func publishReason(rc byte) bool {
	switch rc {
	case 0x81, // malformed packet (an invalid UTF-8 topic, say)
		0x82, // protocol error (a wildcard in a topic name is one)
		0x87, // not authorized (an ACL with deny_action disconnect)
		0x90, // topic name invalid
		0x95, // packet too large
		0x99: // payload format invalid
		return true
	}
	return false
}

func disconnectReason(pd *packets.Disconnect) string {
	if pd.Properties != nil && pd.Properties.ReasonString != "" {
		return pd.Properties.ReasonString
	}
	if s := pd.Reason(); s != "" {
		return s
	}
	return "no reason string"
}

// parkSeq parks the queue's entry seq, if the queue still holds it.
func (u *Upstream) parkSeq(seq uint64, label, why string) error {
	e, ok, err := u.heldEntry(seq)
	if err != nil {
		return fmt.Errorf("read it back from the queue: %w", err)
	}
	if !ok {
		return nil // acknowledged or parked meanwhile: nothing to do
	}
	return u.park(e, label, why)
}

// heldEntry returns the queue's entry seq if it still holds it. Next reads
// what is held before it waits for more, so with a context already done it
// is a lookup (on paho's reading goroutine a wait for a message that is
// gone would stall PUBACKs and PINGRESPs).
func (u *Upstream) heldEntry(seq uint64) (_ queue.Entry, ok bool, _ error) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	es, err := u.q.Next(ctx, seq-1, 1)
	switch {
	case err != nil && !errors.Is(err, context.Canceled):
		return queue.Entry{}, false, err
	case len(es) == 0 || es[0].Seq != seq:
		return queue.Entry{}, false, nil
	}
	return es[0], true, nil
}

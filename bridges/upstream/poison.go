package upstream

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/bastion-iot/bastion/bridges/queue"
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
//   - A connection that ends within poisonWindow of the link writing a
//     PUBLISH that the broker has not answered is suspect. With several
//     PUBLISHes unanswered, which one (if any) was the cause is unknown: the
//     next connections send in slow start (poisonWatch.probeTo), one PUBLISH
//     alone first, then one more in flight for each PUBACK, until the broker
//     has answered past the last one written before the end. Pipelining
//     comes back within a few round trips when nothing is wrong.
//   - A connection that ends so with one PUBLISH alone unanswered names it;
//     the same message named by poisonStrikes such ends in a row is parked
//     (reason connection_closed), and the messages behind it flow.
//
// A broker that drops every connection (it restarts, the uplink flaps)
// rarely does so right after the same message three times in a row, with
// that message alone in flight; if it does, the message is parked, not
// lost, and the log and `bastionctl upstream parked` say why.
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
// closing it on.
func (u *Upstream) connectionEnded(r *sendRun) {
	p := &u.poison
	if r.written == 0 || r.ackedTo.Load() >= r.written || time.Since(r.writtenAt) > poisonWindow {
		// Nothing unanswered, or not just sent: not a message's doing.
		p.suspect, p.dev, p.strikes = 0, "", 0
		return
	}
	p.probeTo = max(p.probeTo, r.written)
	if !r.single {
		p.suspect, p.dev, p.strikes = 0, "", 0
		u.log.Debug("upstream: the connection ended with PUBLISHes unanswered; sending in slow start to find out whether one of them is the cause", "up_to_seq", r.written)
		return
	}
	if r.written != p.suspect {
		p.suspect, p.dev, p.strikes = r.written, r.writtenDev, 0
	}
	p.strikes++
	if p.strikes < poisonStrikes {
		u.log.Info("upstream: the broker closed the connection right after a message, without a PUBACK", "device", p.dev, "seq", p.suspect, "times_in_a_row", p.strikes, "parked_at", poisonStrikes)
		return
	}
	why := fmt.Sprintf("the broker closed the connection %d times in a row within %s of receiving it, without a PUBACK: it likely breaks a limit the broker enforces by disconnecting (topic length or levels, packet size, ACL); the broker's log says which (set upstream.max_topic_length or max_topic_levels for a topic limit), then retry", poisonStrikes, poisonWindow)
	if err := u.parkSeq(p.suspect, "connection_closed", why); err != nil {
		u.setError(fmt.Errorf("upstream broker %s: seq %d from %s: %s; it cannot be parked: %w; it stays at the head of the queue and every message behind it waits",
			u.cur.Load().cfg.Broker, p.suspect, p.dev, why, err))
		return
	}
	p.suspect, p.dev, p.strikes = 0, "", 0
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

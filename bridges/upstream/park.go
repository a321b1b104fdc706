package upstream

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/eclipse/paho.golang/packets"
)

// A message the broker refuses for a reason that resending cannot change
// (it is too large for the broker, its topic or payload is invalid, or the
// gateway may not publish there) would otherwise stay at the head of the
// queue and be resent forever, holding back every device's messages behind
// it. Such a message is parked instead: written durably to a second queue
// (the parking queue, on the same disk), then deleted from the main one.
// Parked messages are kept until an operator retries them (they go back to
// the end of the main queue) or drops them (bastionctl upstream parked).
// Nothing is deleted that is not first held elsewhere.

// parkBurst and parkEvery bound how many messages the broker refused are
// parked with no success in between: parkBurst at once, then one per
// parkEvery. A broker that refuses everything (the gateway lost its
// permission) is a link problem, not a message problem; the rest stays
// queued, each refused device waiting behind its refused message until the
// link tries it again (sendRun.puback), instead of the whole backlog moving
// to the parking queue. A few bad messages in a row still get out of
// the way. What the link parks on its own verdict, from its configuration
// and the broker's announced limits (parkUnsendable: a topic beyond
// max_topic_length or max_topic_levels, a packet beyond the Maximum Packet
// Size), takes nothing from the bucket: the verdict is the message's alone,
// so a device sending many such messages would otherwise use the burst up
// and hold every device's messages for a minute each, and the bucket fills
// only on an accepted message. The parking queue's own limit
// (upstream.parked_max_bytes) bounds those.
const (
	parkBurst = 16
	parkEvery = time.Minute
)

// parkBucket is a token bucket for parking; a message the broker accepted
// fills it. Guarded by Upstream.mu.
type parkBucket struct {
	used int       // tokens taken since the bucket was last full
	at   time.Time // when used last grew from 0
}

func (b *parkBucket) refill() { b.used = 0 }

// giveBack returns a token take gave for a park that then failed: the
// bucket counts messages parked, not tries.
func (b *parkBucket) giveBack() {
	if b.used > 0 {
		b.used--
	}
}

func (b *parkBucket) take(now time.Time) bool {
	if b.used > 0 {
		back := int(now.Sub(b.at) / parkEvery)
		b.used = max(0, b.used-back)
		b.at = b.at.Add(time.Duration(back) * parkEvery)
	}
	if b.used >= parkBurst {
		return false
	}
	if b.used == 0 {
		b.at = now
	}
	b.used++
	return true
}

// ErrNoParking is returned by the parked-message calls when the link has no
// parking queue.
var ErrNoParking = errors.New("upstream: no parking queue is configured")

// permanent reports whether a PUBACK failure reason is about the message
// itself, so that resending it unchanged cannot succeed. 0x80, 0x83 (the
// broker's own trouble), 0x91 and 0x97 (quota: the cloud's back-pressure)
// are retried instead.
func permanent(reason byte) bool {
	switch reason {
	case 0x87, // not authorized
		0x90, // topic name invalid
		0x95, // packet too large (Mosquitto answers a PUBLISH above its message_size_limit so)
		0x99: // payload format invalid
		return true
	}
	return false
}

// reasonName is the metric label and log word for a refusal reason.
func reasonName(reason byte) string {
	switch reason {
	case 0x87:
		return "not_authorized"
	case 0x90:
		return "topic_name_invalid"
	case 0x95:
		return "packet_too_large"
	case 0x99:
		return "payload_format_invalid"
	}
	return fmt.Sprintf("0x%02x", reason)
}

// SetParking gives the link a queue for the messages the broker refuses for
// good (see above). Without one (nil) such a message stays at the head of the
// main queue and is retried, as every other refusal is. Call it before Run.
func (u *Upstream) SetParking(p *queue.Queue) {
	u.parking.Store(p)
}

// park moves entry e, which the broker refused or closed the connection
// on, to the parking queue: why says what is wrong with it and what to
// change, label is the metric's reason (reasonName of the broker's refusal,
// or connection_closed). When it cannot (no parking queue, the burst is used
// up, the parking queue is full or failed) the message stays in the main
// queue and the error says why.
func (u *Upstream) park(e queue.Entry, label, why string) error {
	if u.parking.Load() == nil {
		return errNoParkingQueue
	}
	u.mu.Lock()
	ok := u.parks.take(time.Now())
	u.mu.Unlock()
	if !ok {
		return fmt.Errorf("%d refused messages were parked with no message accepted since, and then one more is parked each %s: the broker may be refusing everything (check its ACL and limits for this gateway)", parkBurst, parkEvery)
	}
	if err := u.parkEntry(e, label, why); err != nil {
		u.mu.Lock()
		u.parks.giveBack()
		u.mu.Unlock()
		return err
	}
	return nil
}

// parkUnsendable is park for a message the link will not send on its own
// verdict (label topic_too_long, topic_too_deep, packet_too_large): it
// takes nothing from the burst (see parkBurst).
func (u *Upstream) parkUnsendable(e queue.Entry, label, why string) error {
	if u.parking.Load() == nil {
		return errNoParkingQueue
	}
	return u.parkEntry(e, label, why)
}

var errNoParkingQueue = errors.New("the link has no parking queue")

// parkEntry writes e to the parking queue, then deletes it from the main
// queue. When that delete fails (the main queue is closed: shutdown) e is
// held twice; the next park of e, in this run of the link or after a
// restart, finds the parked copy (parkedCopy) and only deletes it, so that
// it is parked once and a retry brings back one copy, not two with
// different seqs.
func (u *Upstream) parkEntry(e queue.Entry, label, why string) error {
	p := u.parking.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	log := u.log.With("device", e.Device, "topic", e.Topic, "seq", e.Seq, "bytes", len(e.Payload))
	u.parkMu.Lock()
	defer u.parkMu.Unlock()
	parked, err := u.parkedCopy(p, e.Seq)
	if err != nil {
		// Parked again at worst: a second copy, nothing lost.
		log.Warn("upstream: cannot tell whether the parking queue holds this message already; parking it", "err", err)
	}
	if !parked {
		// Written at QoS 1 whatever the message's own QoS: Accept then
		// returns once the parked copy is durable, or why it is not, and
		// only then is the message deleted from the main queue. At QoS 0
		// it returned before the write, and a write that failed lost the
		// message, counted as parked. A QoS 0 message says so after its
		// seq, for ListParked and RetryParked.
		pm := e.Message
		pm.Topic = e.Topic + "\x00" + why + "\x00" + strconv.FormatUint(e.Seq, 10)
		if pm.QoS == 0 {
			pm.Topic += parkedQoS0
		}
		pm.QoS = 1
		if err := p.Accept(ctx, pm); err != nil {
			log.Error("upstream: a refused message cannot be parked; it stays queued, with its device's later messages behind it, until there is room: retry or drop parked messages with bastionctl upstream parked", "refusal", why, "err", err)
			return fmt.Errorf("the parking queue did not take it (make room: bastionctl upstream parked list, then retry or drop): %w", err)
		}
	}
	if err := u.q.Ack(e.Seq); err != nil {
		// Held twice now; the next park of it finds the parked copy.
		u.parkedFrom = nil
		log.Error("upstream: parked message could not be deleted from the queue; its next park only deletes it", "err", err)
		return fmt.Errorf("parked, but not deleted from the queue: %w", err)
	}
	if parked {
		delete(u.parkedFrom, e.Seq)
		log.Info("upstream: a message parked already (its delete from the queue had failed) deleted from the queue", "reason", label)
		return nil
	}
	u.m.parked.WithLabelValues(label).Inc()
	u.mu.Lock()
	u.st.LastParked = why
	u.st.LastParkedAt = time.Now()
	u.mu.Unlock()
	log.Warn("upstream: message the broker refuses for good, or would, parked so the messages behind it flow (bastionctl upstream parked list | retry | drop)", "reason", label, "refusal", why)
	return nil
}

// parkedCopy reports whether the parking queue holds a copy of the main
// queue's entry seq. The first call (and the first after a failed delete
// from the main queue) reads the parking queue through and keeps the copies
// whose entry the main queue still holds, normally none. Caller holds
// u.parkMu.
func (u *Upstream) parkedCopy(p *queue.Queue, seq uint64) (bool, error) {
	if u.parkedFrom == nil {
		from := map[uint64]uint64{}
		for after := uint64(0); ; {
			es, err := p.Held(after, 64)
			if err != nil {
				return false, fmt.Errorf("read the parking queue: %w", err)
			}
			if len(es) == 0 {
				break
			}
			for _, e := range es {
				after = e.Seq
				if _, _, f := splitParked(e.Message); f != 0 {
					if _, ok, err := u.heldEntry(f); err == nil && ok {
						from[f] = e.Seq
					}
				}
			}
		}
		u.parkedFrom = from
	}
	ps, ok := u.parkedFrom[seq]
	if !ok {
		return false, nil
	}
	// Still parked? A retry or drop may have taken it since.
	es, err := p.Held(ps-1, 1)
	if err != nil {
		return false, fmt.Errorf("read the parking queue: %w", err)
	}
	if len(es) == 1 && es[0].Seq == ps {
		if _, _, f := splitParked(es[0].Message); f == seq {
			return true, nil
		}
	}
	delete(u.parkedFrom, seq)
	return false, nil
}

// parkRefused parks PUBLISH seq after a PUBACK with a permanent failure
// reason; handled means the refusal needs nothing more (no retry, no
// holding back its device). A permanent refusal that could not be parked
// (the parking queue full or failing, the burst used up) returns why in
// err: the message stays queued and only its device waits (sendRun.puback).
// It runs on paho's reading goroutine; the entry is read back from the
// queue, which normally still holds it. It may not: a later run on the
// same connection can send seq again before the first copy's PUBACK, and
// that copy's refusal already parked it. Then it is handled.
func (u *Upstream) parkRefused(seq uint64, dev string, reason byte, why string) (handled bool, err error) {
	if u.parking.Load() == nil || !permanent(reason) {
		return false, nil
	}
	e, ok, err := u.heldEntry(seq) // a lookup: it never waits
	switch {
	case err != nil:
		return false, nil // unreadable: leave it to the retry
	case !ok:
		u.log.Info("upstream: a refused message is no longer queued (parked or accepted as another copy); nothing to do", "device", dev, "seq", seq, "refusal", why)
		return true, nil
	}
	if err := u.park(e, reasonName(reason), why); err != nil {
		return false, err
	}
	return true, nil
}

// The parking queue keeps why each message was refused after its topic and
// a NUL, which no topic contains (bridges/hub refuses it; MQTT forbids it),
// then another NUL and the message's seq in the main queue (from; 0 in
// what was parked before it was kept), then parkedQoS0 for a QoS 0 message
// (parked at QoS 1: see parkEntry; before that, at its own QoS).
func splitParked(m bridges.Message) (_ bridges.Message, why string, from uint64) {
	m.Topic, why, _ = strings.Cut(m.Topic, "\x00")
	if w, ok := strings.CutSuffix(why, parkedQoS0); ok {
		why, m.QoS = w, 0
	}
	if i := strings.LastIndexByte(why, 0); i >= 0 {
		if f, err := strconv.ParseUint(why[i+1:], 10, 64); err == nil {
			why, from = why[:i], f
		}
	}
	return m, why, from
}

// parkedQoS0 ends the topic of a parked QoS 0 message (see splitParked).
const parkedQoS0 = "\x00qos0"

// Parked is a snapshot of the parking queue.
type Parked struct {
	Depth    int             `json:"depth"`
	Bytes    int64           `json:"bytes"`
	Messages []ParkedMessage `json:"messages,omitempty"`
}

// ParkedMessage is one parked message, without its payload.
type ParkedMessage struct {
	Seq      uint64    `json:"seq"`
	Device   string    `json:"device"`
	Topic    string    `json:"topic"`
	Bytes    int       `json:"bytes"`
	QoS      byte      `json:"qos"`
	Received time.Time `json:"received"`
	Why      string    `json:"why"` // the broker's refusal
}

// ListParked returns the parking queue's depth and up to max of its
// messages, oldest first.
func (u *Upstream) ListParked(ctx context.Context, max int) (Parked, error) {
	p := u.parking.Load()
	if p == nil {
		return Parked{}, ErrNoParking
	}
	st := p.Stats()
	out := Parked{Depth: st.Depth, Bytes: st.Bytes}
	var after uint64
	for len(out.Messages) < max && len(out.Messages) < st.Depth {
		es, err := p.Held(after, min(64, max-len(out.Messages)))
		if err != nil {
			return out, err
		}
		if len(es) == 0 {
			break
		}
		for _, e := range es {
			m, why, _ := splitParked(e.Message)
			out.Messages = append(out.Messages, ParkedMessage{Seq: e.Seq, Device: m.Device, Topic: m.Topic, Bytes: len(m.Payload), QoS: m.QoS, Received: m.Received, Why: why})
			after = e.Seq
		}
	}
	return out, nil
}

// RetryParked moves every parked message back to the end of the main queue
// (durably, then deletes it from the parking queue) and returns how many it
// moved. A retried message is sent after the messages that arrived while it
// was parked, and is as old as its retry: the main queue stamps it anew. With
// the time its device sent it, a message parked for days would reach the
// head of the queue beyond its age bound, which refuses every device's
// messages while the oldest held one is too old.
//
// A device whose message the main queue refuses (bridges.ErrQueueFull: the
// device holds its share of the queue, or the queue is full) keeps that
// message and its later ones parked, so that none overtakes it, and the
// other devices' messages are still moved: one device over its share used
// to stop the retry for every device. The error then says how many stay
// parked, of which devices and why (a *RetryKept, wrapping each device's
// refusal). Any other failure stops the retry; what was not moved stays
// parked.
func (u *Upstream) RetryParked(ctx context.Context) (int, error) {
	n, kept, err := u.drainParked(ctx, func(e queue.Entry) error {
		m, _, _ := splitParked(e.Message)
		m.Received = time.Time{}
		if err := u.q.Accept(ctx, m); err != nil {
			return fmt.Errorf("upstream: retry parked seq %d from %s: %w", e.Seq, e.Device, err)
		}
		return nil
	}, func(err error) bool { return errors.Is(err, bridges.ErrQueueFull) })
	for _, k := range kept {
		u.log.Warn("upstream: a device's parked messages stay parked: the main queue refused the first of them; retry once it has room for them", "device", k.Device, "count", k.Messages, "err", k.Err)
	}
	if len(kept) > 0 {
		err = errors.Join(err, &RetryKept{Devices: kept})
	}
	u.log.Info("upstream: parked messages moved back to the queue", "count", n, "kept_devices", len(kept), "err", err)
	u.retryStalled(n)
	return n, err
}

// RetryKept is RetryParked's error when the main queue refused some
// devices' parked messages: those stay parked, the others were moved.
type RetryKept struct {
	Devices []KeptDevice // in the order their first refusal came
}

// KeptDevice is one device whose parked messages a retry left parked.
type KeptDevice struct {
	Device   string
	Messages int   // the refused one and its device's later parked messages
	Err      error // the main queue's refusal of the first
}

func (e *RetryKept) Error() string {
	n := 0
	for _, k := range e.Devices {
		n += k.Messages
	}
	var b strings.Builder
	fmt.Fprintf(&b, "upstream: %d parked messages of %d devices stay parked, the main queue refused them (the other devices' were moved; retry once it has room)", n, len(e.Devices))
	// A full queue refuses every device: name a few, not thousands.
	const named = 5
	for i, k := range e.Devices {
		if i == named {
			fmt.Fprintf(&b, "; and %d more devices", len(e.Devices)-named)
			break
		}
		fmt.Fprintf(&b, "; %s: %d (%v)", k.Device, k.Messages, k.Err)
	}
	return b.String()
}

func (e *RetryKept) Unwrap() []error {
	errs := make([]error, len(e.Devices))
	for i, k := range e.Devices {
		errs[i] = k.Err
	}
	return errs
}

// DropParked deletes every parked message (an operator's decision: they are
// gone) and returns how many.
func (u *Upstream) DropParked(ctx context.Context) (int, error) {
	n, _, err := u.drainParked(ctx, func(queue.Entry) error { return nil }, nil)
	u.log.Warn("upstream: parked messages dropped by the operator", "count", n, "err", err)
	u.retryStalled(n)
	return n, err
}

// retryStalled ends the sender's current run if it left a message unsent
// for want of room in the parking queue (sendRun.stall), now that n parked
// messages left it: the next run starts at once from the queue's head and
// parks it.
func (u *Upstream) retryStalled(n int) {
	if n == 0 {
		return
	}
	u.roomMade.Add(1)
	if r := u.running.Load(); r != nil && r.stalled.Load() {
		u.log.Info("upstream: room in the parking queue; sending again from the head of the queue to park the messages that did not fit")
		r.rerun()
	}
}

// drainParked calls each on the messages parked now, oldest first, and
// deletes from the parking queue each that it returns nil for. An error
// that refused reports true for keeps that message and every later one of
// its device parked (kept), and the others go on; any other error stops it.
func (u *Upstream) drainParked(ctx context.Context, each func(queue.Entry) error, refused func(error) bool) (int, []KeptDevice, error) {
	p := u.parking.Load()
	if p == nil {
		return 0, nil, ErrNoParking
	}
	// Only what is parked now: a retried message refused again is parked
	// again, after these, and must not be retried in the same call.
	todo := p.Stats().Depth
	var (
		n, seen int
		after   uint64
		kept    []KeptDevice
		keptAt  = map[string]int{} // device → its index in kept
	)
	for ctx.Err() == nil && seen < todo {
		es, err := p.Held(after, min(64, todo-seen))
		if err != nil || len(es) == 0 {
			return n, kept, err
		}
		for _, e := range es {
			after = e.Seq
			seen++
			if i, ok := keptAt[e.Device]; ok {
				kept[i].Messages++
				continue
			}
			if err := each(e); err != nil {
				if refused == nil || !refused(err) {
					return n, kept, err
				}
				keptAt[e.Device] = len(kept)
				kept = append(kept, KeptDevice{Device: e.Device, Messages: 1, Err: err})
				continue
			}
			if err := p.Ack(e.Seq); err != nil {
				return n, kept, fmt.Errorf("upstream: delete parked seq %d: %w", e.Seq, err)
			}
			n++
		}
	}
	return n, kept, ctx.Err()
}

// pubackReason is the text of a PUBACK failure reason.
func pubackReason(reason byte) string {
	why := (&packets.Puback{ReasonCode: reason}).Reason()
	if why == "" && reason == 0x95 {
		why = "packet too large"
	}
	return why
}

// Package bridges holds the message model shared by the device transports
// (CoAP over DTLS, MQTT over TLS) and the upstream link, and the
// per-source limit both transports hold their unauthenticated connections
// to (SourceLimit). It owns no sockets.
//
// Every message carries the authenticated identity of the device it came
// from; nothing in Bastion routes a message whose origin is not a device
// identity the gateway itself verified.
package bridges

import (
	"context"
	"errors"
	"time"
)

// Message is one unit of device traffic, whichever transport carried it.
type Message struct {
	// Device is the authenticated device identity that sent the message
	// (or, for commands, the device it is addressed to).
	Device string
	// Topic is the local topic, always under devices/{Device}/.
	Topic string
	// Payload is opaque to the gateway.
	Payload []byte
	// QoS is 0 (best effort) or 1 (at least once). A confirmable CoAP
	// request is QoS 1.
	QoS byte
	// Received is when the gateway accepted the message.
	Received time.Time
}

// Sink accepts telemetry from a device transport. Accept returns only when the
// message is safely held: for QoS 1 that means durably written, so a
// transport may acknowledge the device once Accept returns nil.
type Sink interface {
	Accept(ctx context.Context, m Message) error
}

// AsyncSink is a Sink that can admit a message without waiting for it to
// be durable, so that a transport can read a device's next message while the
// disk catches up and acknowledge each one later, in order (per-session
// pipelining). Accept keeps its meaning.
type AsyncSink interface {
	Sink
	// AcceptAsync makes every decision Accept makes before it would wait
	// (ErrQueueFull, too large, refused) and returns without waiting for
	// the disk. A nil channel means the message is already as accepted as
	// a nil from Accept says (QoS 0, or kept local by a privacy rule).
	// Otherwise exactly one value arrives on it: nil once the message is
	// held as safely as Accept promises, or the error Accept would have
	// returned. The device may be acknowledged only after that nil. ctx
	// bounds the admission only.
	AcceptAsync(ctx context.Context, m Message) (durable <-chan error, err error)
}

// NotifySink is an AsyncSink that reports durability by calling a function
// instead of sending on a channel, so that a transport need not keep a
// goroutine parked per message (or per session) waiting for the disk: the
// sink's own goroutine calls done once the group commit covering the message
// returned. Accept and AcceptAsync keep their meaning.
type NotifySink interface {
	AsyncSink
	// AcceptNotify makes AcceptAsync's decisions. pending false: done is
	// never called, and the message is as accepted as err says (nil: as a
	// nil from Accept). pending true: done is called exactly once, with
	// what AcceptAsync's channel would carry, on a goroutine of the sink's
	// that stalls every other message while done runs: done must not wait
	// on a peer (no TCP or TLS write, which a device that stops reading
	// can hold up; no lock held across one). Sending one UDP datagram,
	// which waits for no peer, is allowed: the CoAP bridge answers a
	// deferred request from done that way.
	AcceptNotify(ctx context.Context, m Message, done func(error)) (pending bool, err error)
}

// AcceptNotify admits m to s with done called back if s is a NotifySink;
// any other Sink is waited for here, as Accept waits (pending false).
func AcceptNotify(ctx context.Context, s Sink, m Message, done func(error)) (pending bool, err error) {
	if ns, ok := s.(NotifySink); ok {
		return ns.AcceptNotify(ctx, m, done)
	}
	return false, s.Accept(ctx, m)
}

// ErrQueueFull is returned by a Sink that cannot take the message now but
// may later: its queue is full (by bytes or by the age of its oldest
// message, the upstream link down or slow; or no space left on the disk),
// or the device's own queued messages are held up behind one that can be
// neither sent nor parked. The error wrapping it says which. The transport
// refuses the message to the device (MQTT 0x97 quota exceeded, CoAP 5.03
// with Max-Age) instead of dropping it.
var ErrQueueFull = errors.New("the gateway cannot queue the message now; retry later")

// ErrTopicRefused is returned by a Sink that will never take a message on
// its topic (the upstream link's configured limits on upstream topics):
// sending it again cannot succeed. The transport refuses it to the device as
// a bad topic (MQTT 5 PUBACK 0x90 topic name invalid, CoAP 4.00), not as a
// full queue, which asks the device to send it again later.
var ErrTopicRefused = errors.New("the gateway refuses messages on this topic")

// ErrDiskFailed marks a Sink's failure to store a message on its disk (a
// write or fsync error, or a queue stopped after one). Transports answer it
// as they answer any other error; it is named so that the refusal can be
// counted as the gateway's disk at fault, apart from ErrQueueFull (a
// backlog, or no space left: the device should retry later).
var ErrDiskFailed = errors.New("the gateway's disk failed to store the message")

// ErrNoReceiver is returned for a command the gateway took and kept (as
// its topic's last command, for the device's next CoAP GET or Observe)
// that no device session received: the device has no CoAP observer and no
// MQTT subscription on that topic right now. A caller that counts
// deliveries counts it apart from both "delivered" and "refused".
var ErrNoReceiver = errors.New("command kept, but no device session is observing or subscribed to its topic")

// TopicPrefix is the namespace a device may publish and subscribe in.
func TopicPrefix(device string) string { return "devices/" + device + "/" }

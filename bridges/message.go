// Package bridges holds the message model shared by the device transports
// (CoAP over DTLS, MQTT over TLS) and the upstream link. It owns no sockets.
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

// ErrQueueFull is returned by a Sink that cannot take more messages. The
// transport refuses the message to the device (MQTT 0x97 quota exceeded,
// CoAP 5.03 with Max-Age) instead of dropping it.
var ErrQueueFull = errors.New("message queue full: the upstream link is down or slow; retry later")

// TopicPrefix is the namespace a device may publish and subscribe in.
func TopicPrefix(device string) string { return "devices/" + device + "/" }

package mqtt

import (
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestQoS2PublishRefused: the gateway takes QoS 0 and 1 only. mochi
// lowered a QoS 2 PUBLISH to QoS 1 and answered it with a PUBACK, which a
// QoS 2 sender does not take as an answer (3.1.1 has no Maximum QoS and
// wants PUBREC; an MQTT 5 client told Maximum QoS 1 must not send QoS 2):
// it kept the message in flight and resent it after every reconnect. Now
// such a PUBLISH ends the session, with DISCONNECT 0x9B QoS not supported
// in MQTT 5 (3.1.1: the connection is closed), is not taken, and is
// counted as qos_not_supported.
func TestQoS2PublishRefused(t *testing.T) {
	for _, ver := range []byte{5, 4} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			r := newRig(t, queue.Options{})
			d := r.dial(t, "q2", ver)
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 2}, PacketID: 7,
				TopicName: "devices/q2/t/x", Payload: []byte("two")})
			pk, err := d.readErr(5 * time.Second)
			switch {
			case isTimeout(err):
				t.Fatal("no answer and the connection still open after a QoS 2 PUBLISH")
			case ver == 5 && (err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrQosNotSupported.Code):
				t.Fatalf("got packet type %d reason 0x%02x (%v), want DISCONNECT 0x9B", pk.FixedHeader.Type, pk.ReasonCode, err)
			case ver == 4 && err == nil:
				t.Fatalf("got packet type %d reason 0x%02x, want the connection closed", pk.FixedHeader.Type, pk.ReasonCode)
			}
			d.closed()
			waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
			if got := r.refusals(hub.ReasonQoS); got != 1 {
				t.Errorf("qos_not_supported refusals %v, want 1", got)
			}
			if q := r.queued(t); len(q) != 0 {
				t.Errorf("queue holds %q", q)
			}
		})
	}
}

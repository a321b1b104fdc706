package mqtt

import (
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestPubackPlain: the PUBACK of an MQTT 5 QoS 1 publish with user
// properties is success (0x00) and carries none of them. mochi echoed the
// device's properties into the PUBACK unless NoInheritedPropertiesOnAck is
// set, and with properties to encode it wrote reason 0x01, which is no
// PUBACK reason code (mochi patch (21) fixes the code; New sets the
// capability).
func TestPubackPlain(t *testing.T) {
	r := newRig(t, queue.Options{})
	d := r.dial(t, "props", 5)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 9,
		TopicName: "devices/props/t/n", Payload: []byte("x"),
		Properties: packets.Properties{User: []packets.UserProperty{{Key: "trace", Val: "abc"}}}})
	pk := d.read(5 * time.Second)
	if pk.FixedHeader.Type != packets.Puback || pk.PacketID != 9 {
		t.Fatalf("got packet type %d id %d, want the PUBACK of id 9", pk.FixedHeader.Type, pk.PacketID)
	}
	if pk.ReasonCode != packets.CodeSuccess.Code {
		t.Errorf("PUBACK reason %#x, want 0x00 success", pk.ReasonCode)
	}
	if len(pk.Properties.User) > 0 {
		t.Errorf("PUBACK echoes the device's user properties: %v", pk.Properties.User)
	}
}

package mqtt

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// userProps is n bytes of MQTT 5 user properties.
func userProps(n int) []packets.UserProperty {
	var u []packets.UserProperty
	for ; n > 0; n -= 200 {
		u = append(u, packets.UserProperty{Key: "k", Val: strings.Repeat("v", 200)})
	}
	return u
}

// TestRetainedRecordBounded: the broker keeps a retained message whole
// (topic, payload and properties) in memory and in the store for as long as
// it is retained. Only its payload was bounded (MaxPayload), so a device
// could retain a 1-byte payload with max_packet_size of user properties on
// each of its MaxRetained topics. Now a retained publish whose topic,
// payload and properties are larger than MaxPayload + 1 KiB is refused as
// a payload too large (MQTT 5 PUBACK 0x95, payload_too_large) and is
// neither retained nor queued; one within it, and one not retained with
// the same properties (whose properties are not kept), are taken. A
// retained Will so large is refused at CONNECT (0x87), as a Will with too
// large a payload is.
func TestRetainedRecordBounded(t *testing.T) {
	const maxPayload = 256
	r := newRigWith(t, queue.Options{}, Config{MaxPayload: maxPayload}, nil)
	d := r.dial(t, "deva", 5)
	var id uint16
	publish := func(topic string, retain bool, user []packets.UserProperty) byte {
		t.Helper()
		id++
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: retain}, PacketID: id,
			TopicName: "devices/deva/s/" + topic, Payload: []byte(topic), Properties: packets.Properties{User: user}})
		pk := d.read(5 * time.Second)
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != id {
			t.Fatalf("%s: got packet type %d id %d, want PUBACK %d", topic, pk.FixedHeader.Type, pk.PacketID, id)
		}
		return pk.ReasonCode
	}
	before := r.refusals(hub.ReasonTooLarge)
	if got := publish("big", true, userProps(8<<10)); got != packets.ErrPacketTooLarge.Code {
		t.Errorf("retained publish with 8 KiB of user properties: PUBACK %#x, want %#x", got, packets.ErrPacketTooLarge.Code)
	}
	// Success: mochi answers a PUBLISH with properties with its QoS as
	// the reason code (0x01).
	if got := publish("fits", true, userProps(maxPayload)); got >= 0x80 {
		t.Errorf("retained publish within MaxPayload + 1 KiB: PUBACK %#x, want success", got)
	}
	if got := publish("kept-not", false, userProps(8<<10)); got >= 0x80 {
		t.Errorf("publish not retained with 8 KiB of user properties: PUBACK %#x, want success", got)
	}
	if got := r.refusals(hub.ReasonTooLarge) - before; got != 1 {
		t.Errorf("payload_too_large refusals %v, want 1", got)
	}
	if _, ok := r.s.Retained("devices/deva/s/big"); ok {
		t.Error("the refused message is retained")
	}
	if _, ok := r.s.Retained("devices/deva/s/fits"); !ok {
		t.Error("the message within the bound is not retained")
	}
	if diff := cmp.Diff([]string{"fits", "kept-not"}, r.queued(t)); diff != "" {
		t.Errorf("queue (-want +got):\n%s", diff)
	}

	before = r.refusals(hub.ReasonTooLarge)
	w := r.dialTLS(t, "deva", 5, true)
	pk := w.connectWill(packets.ConnectParams{WillTopic: "devices/deva/s/online", WillPayload: []byte("0"), WillRetain: true, WillQos: 1,
		WillProperties: packets.Properties{User: userProps(2 << 10)}})
	if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("retained Will with 2 KiB of user properties: got packet type %d reason %#x, want CONNACK %#x",
			pk.FixedHeader.Type, pk.ReasonCode, packets.ErrNotAuthorized.Code)
	}
	if got := r.refusals(hub.ReasonTooLarge) - before; got != 1 {
		t.Errorf("payload_too_large refusals for the Will %v, want 1", got)
	}
}

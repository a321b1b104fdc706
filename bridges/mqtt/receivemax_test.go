package mqtt

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// connectReceiveMax connects dev (MQTT 5) with Receive Maximum rm,
// resuming its kept session, if any, and keeping it an hour after this
// connection.
func (r *rig) connectReceiveMax(t *testing.T, dev string, rm uint16) *device {
	t.Helper()
	d := r.dialTLS(t, dev, 5, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 60, ClientIdentifier: dev},
		Properties: packets.Properties{SessionExpiryInterval: 3600, SessionExpiryIntervalFlag: true,
			ReceiveMaximum: rm}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("CONNACK: type %d reason %#x", pk.FixedHeader.Type, pk.ReasonCode)
	}
	return d
}

// TestReceiveMaximumOneGetsEveryCommand: a device that takes one QoS 1
// message at a time (Receive Maximum 1) gets every command sent to it, in
// order, one after another's PUBACK, and a command it has not
// acknowledged when its connection ends is sent again to its next one.
// mochi (patch (19)) deleted a message it sent once the quota freed up:
// its PUBACK then gave no quota back, so the third command waited for the
// device's next connection, and, had the connection ended first, the
// second was lost.
func TestReceiveMaximumOneGetsEveryCommand(t *testing.T) {
	const dev = "rm1"
	r := newRigWith(t, queue.Options{}, Config{}, nil)
	d := r.connectReceiveMax(t, dev, 1)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: bridges.TopicPrefix(dev) + "c/#", Qos: 1}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("got packet type %d, want the SUBACK", pk.FixedHeader.Type)
	}

	for i := range 4 {
		if !r.command(t, dev, i) {
			t.Fatalf("command %d not taken by the session", i)
		}
	}
	if diff := cmp.Diff(numbers(0, 4), d.readCommands(4)); diff != "" {
		t.Fatalf("commands (-want +got):\n%s", diff)
	}

	// The fifth goes out at once, the sixth once the fifth is
	// acknowledged; the sixth is left unacknowledged.
	r.command(t, dev, 4)
	r.command(t, dev, 5)
	if diff := cmp.Diff(numbers(4, 5), d.readCommands(1)); diff != "" {
		t.Fatalf("commands (-want +got):\n%s", diff)
	}
	pk := d.read(5 * time.Second)
	if pk.FixedHeader.Type != packets.Publish || string(pk.Payload[:4]) != "0005" {
		t.Fatalf("got packet type %d payload %.4q, want command 0005", pk.FixedHeader.Type, pk.Payload)
	}
	r.leave(t, d)

	d = r.connectReceiveMax(t, dev, 1)
	pk = d.read(5 * time.Second)
	if pk.FixedHeader.Type != packets.Publish || string(pk.Payload[:4]) != "0005" || !pk.FixedHeader.Dup {
		t.Fatalf("after reconnecting: got packet type %d payload %.4q dup %v, want command 0005 sent again",
			pk.FixedHeader.Type, pk.Payload, pk.FixedHeader.Dup)
	}
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	waitFor(t, "the session to hold nothing", func() bool { return r.session(t, dev).State.Inflight.Len() == 0 })
}

// TestReceiveMaximumOneResumedSession: a device with Receive Maximum 1 that
// comes back to a session holding three commands gets one at a time, one
// after another's PUBACK, and each once. mochi (patch (22)) wrote every
// held command at once when the session resumed, past the device's
// Receive Maximum (a conforming client disconnects for that, 0x93, and
// would meet the same on every reconnect), and those that had waited for
// quota stayed marked waiting, so each PUBACK sent one of them again.
func TestReceiveMaximumOneResumedSession(t *testing.T) {
	const dev = "rm2"
	r := newRigWith(t, queue.Options{}, Config{}, nil)
	d := r.connectReceiveMax(t, dev, 1)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: bridges.TopicPrefix(dev) + "c/#", Qos: 1}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("got packet type %d, want the SUBACK", pk.FixedHeader.Type)
	}
	r.leave(t, d)
	for i := range 3 {
		if !r.command(t, dev, i) {
			t.Fatalf("command %d not taken by the session", i)
		}
	}

	d = r.connectReceiveMax(t, dev, 1)
	// A PINGRESP is written after whatever the session was sent before
	// the PINGREQ was read: the next packet says what went out.
	ping := func(when string) {
		t.Helper()
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Pingresp {
			t.Fatalf("%s: got packet type %d payload %.4q, want the PINGRESP (nothing more sent)", when, pk.FixedHeader.Type, pk.Payload)
		}
	}
	var got []string
	for i := range 3 {
		pk := d.read(5 * time.Second)
		if pk.FixedHeader.Type != packets.Publish {
			t.Fatalf("got packet type %d, want command %d", pk.FixedHeader.Type, i)
		}
		got = append(got, string(pk.Payload[:4]))
		ping("with a command unacknowledged")
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	}
	if diff := cmp.Diff(numbers(0, 3), got); diff != "" {
		t.Fatalf("commands (-want +got):\n%s", diff)
	}
	ping("after every command was acknowledged")
	waitFor(t, "the session to hold nothing", func() bool { return r.session(t, dev).State.Inflight.Len() == 0 })
}

package mqtt

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// heldCmdSize is the payload of the commands these tests send.
const heldCmdSize = 1024

// heldPer is what the broker counts for one such command held for dev:
// topic and payload, its subscription's identifier and its own overhead.
func heldPer(dev string) int64 {
	return mochi.HeldSize(&packets.Packet{TopicName: bridges.TopicPrefix(dev) + "c/cmd", Payload: make([]byte, heldCmdSize),
		Properties: packets.Properties{SubscriptionIdentifier: []int{0}}})
}

// dialKept connects dev (MQTT 5) with a session kept an hour after its
// connection and subscribes it to its commands at QoS 1.
func (r *rig) dialKept(t *testing.T, dev string) *device {
	t.Helper()
	d := r.resume(t, dev)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: bridges.TopicPrefix(dev) + "c/#", Qos: 1}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("got packet type %d, want the SUBACK", pk.FixedHeader.Type)
	}
	return d
}

// resume connects dev (MQTT 5) resuming its kept session, if any (which
// then sends the commands it holds for dev), and keeping it an hour after
// this connection.
func (r *rig) resume(t *testing.T, dev string) *device {
	t.Helper()
	d := r.dialTLS(t, dev, 5, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect:    packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 60, ClientIdentifier: dev},
		Properties: packets.Properties{SessionExpiryInterval: 3600, SessionExpiryIntervalFlag: true}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("CONNACK: type %d reason %#x", pk.FixedHeader.Type, pk.ReasonCode)
	}
	return d
}

// leave disconnects d and waits until the broker holds its session as
// disconnected.
func (r *rig) leave(t *testing.T, d *device) {
	t.Helper()
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}})
	d.closed()
	waitFor(t, "the session of "+d.id+" to be disconnected", func() bool {
		cl, ok := r.s.mq.Clients.Get(d.id)
		return ok && cl.Closed()
	})
}

// session is the broker's session of dev.
func (r *rig) session(t *testing.T, dev string) *mochi.Client {
	t.Helper()
	cl, ok := r.s.mq.Clients.Get(dev)
	if !ok {
		t.Fatalf("no session of %s", dev)
	}
	return cl
}

// command delivers command n to dev as the upstream downlink does and
// reports whether a device session took it.
func (r *rig) command(t *testing.T, dev string, n int) bool {
	t.Helper()
	payload := fmt.Appendf(nil, "%04d", n)
	payload = append(payload, make([]byte, heldCmdSize-len(payload))...)
	reached, err := r.hub.DeliverReached(context.Background(), bridges.Message{Device: dev,
		Topic: bridges.TopicPrefix(dev) + "c/cmd", Payload: payload, QoS: 1})
	if err != nil {
		t.Fatal(err)
	}
	return reached
}

// readCommands reads n commands, acknowledging each, and returns their
// numbers.
func (d *device) readCommands(n int) []string {
	d.t.Helper()
	var got []string
	for range n {
		pk := d.read(5 * time.Second)
		if pk.FixedHeader.Type != packets.Publish {
			d.t.Fatalf("device %s: got packet type %d, want a command", d.id, pk.FixedHeader.Type)
		}
		got = append(got, string(pk.Payload[:4]))
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID})
	}
	return got
}

func numbers(from, to int) []string {
	var s []string
	for i := from; i < to; i++ {
		s = append(s, fmt.Sprintf("%04d", i))
	}
	return s
}

// TestOfflineSessionHoldsBoundedCommands: a device with a QoS 1
// subscription whose connection ended keeps its session, and the broker
// holds the commands for it until it comes back. They were bounded only by
// MaxInflight (64 of them, whatever their size); now by MaxHeldBytes: of
// 100 commands the first that fit are held (each reported taken), the rest
// refused (not taken, counted commands_held), and the session never holds
// more. Back, the device gets the held ones, in the order they were sent
// (mochi patch (18); it resent those of one second in a random order), and
// nothing else.
func TestOfflineSessionHoldsBoundedCommands(t *testing.T) {
	const budget = 16 << 10
	r := newRigWith(t, queue.Options{}, Config{MaxHeldBytes: budget}, nil)
	r.leave(t, r.dialKept(t, "off"))
	cl := r.session(t, "off")
	fit := int(budget / heldPer("off"))

	taken := 0
	for i := range 100 {
		if r.command(t, "off", i) {
			taken++
		}
		if held := cl.HeldBytes(); held > budget {
			t.Fatalf("after command %d the session holds %d bytes, bound %d", i, held, budget)
		}
	}
	if taken != fit {
		t.Errorf("%d commands taken for the disconnected session, want the %d that fit", taken, fit)
	}
	if got := r.refusals(hub.ReasonCommandsHeld); got != float64(100-fit) {
		t.Errorf("commands_held refusals %v, want %d", got, 100-fit)
	}

	d := r.resume(t, "off")
	if diff := cmp.Diff(numbers(0, fit), d.readCommands(fit)); diff != "" {
		t.Errorf("commands after reconnecting (-want +got):\n%s", diff)
	}
	if pk, err := d.readErr(200 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("device got packet type %d (err %v) past the held commands", pk.FixedHeader.Type, err)
	}
	waitFor(t, "the acknowledged commands given back", func() bool { return r.s.mq.HeldBytes() == 0 })
}

// TestReadingDeviceGetsEveryCommand: a connected device that reads and
// acknowledges its commands gets every one, in order, ten times its
// MaxHeldBytes in all: each acknowledgement gives its command's bytes back.
func TestReadingDeviceGetsEveryCommand(t *testing.T) {
	const budget = 16 << 10
	r := newRigWith(t, queue.Options{}, Config{MaxHeldBytes: budget}, nil)
	d := r.dialKept(t, "on")
	burst := int(budget / heldPer("on"))
	var got []string
	for round := range 10 {
		for k := range burst {
			if !r.command(t, "on", round*burst+k) {
				t.Fatalf("command %d not taken by the connected session", round*burst+k)
			}
		}
		got = append(got, d.readCommands(burst)...)
		waitFor(t, "the acknowledged commands given back", func() bool { return r.s.mq.HeldBytes() == 0 })
	}
	if diff := cmp.Diff(numbers(0, 10*burst), got); diff != "" {
		t.Errorf("commands (-want +got):\n%s", diff)
	}
	if n := r.refusals(hub.ReasonCommandsHeld); n != 0 {
		t.Errorf("commands_held refusals %v, want 0", n)
	}
}

// TestHeldCommandsTotalDropsDisconnectedFirst: MaxHeldBytesTotal bounds
// what all sessions hold. A command that would go past it is made room for
// by dropping what a disconnected session holds, the one disconnected
// first (counted commands_evicted, one per command dropped); a connected
// session that does not acknowledge keeps what it holds, and is refused
// past its own MaxHeldBytes, which drops nothing more for it.
func TestHeldCommandsTotalDropsDisconnectedFirst(t *testing.T) {
	const budget = 16 << 10
	fit := int(budget / heldPer("off1"))
	total := 2*int64(fit)*heldPer("off1") + heldPer("on")/2
	r := newRigWith(t, queue.Options{}, Config{MaxHeldBytes: budget, MaxHeldBytesTotal: total}, nil)
	for _, dev := range []string{"off1", "off2"} {
		r.leave(t, r.dialKept(t, dev))
		for i := range fit {
			if !r.command(t, dev, i) {
				t.Fatalf("command %d not held for the disconnected session of %s", i, dev)
			}
		}
	}
	on := r.dialKept(t, "on") // reads nothing, acknowledges nothing
	taken := 0
	for i := range 20 {
		if r.command(t, "on", i) {
			taken++
		}
		if held := r.s.mq.HeldBytes(); held > total {
			t.Fatalf("after command %d all sessions hold %d bytes, bound %d", i, held, total)
		}
	}
	if taken != fit {
		t.Errorf("%d commands taken by the connected session, want %d (its MaxHeldBytes)", taken, fit)
	}
	if got := r.refusals(hub.ReasonCommandsEvicted); got != float64(fit) {
		t.Errorf("commands_evicted %v, want the %d held for the session disconnected first", got, fit)
	}
	if held := r.session(t, "off1").HeldBytes(); held != 0 {
		t.Errorf("the session disconnected first still holds %d bytes", held)
	}
	if got := r.refusals(hub.ReasonCommandsHeld); got != float64(20-fit) {
		t.Errorf("commands_held %v, want %d", got, 20-fit)
	}
	if diff := cmp.Diff(numbers(0, fit), on.readCommands(fit)); diff != "" {
		t.Errorf("commands of the connected device (-want +got):\n%s", diff)
	}
	d := r.resume(t, "off1")
	if pk, err := d.readErr(200 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("the device whose commands were dropped got packet type %d (err %v)", pk.FixedHeader.Type, err)
	}
	if diff := cmp.Diff(numbers(0, fit), r.resume(t, "off2").readCommands(fit)); diff != "" {
		t.Errorf("commands of the device disconnected second (-want +got):\n%s", diff)
	}
}

// TestSortHeldOldestFirst: makeRoom drops from the session disconnected
// longest first; sessions disconnected in the same second by id.
func TestSortHeldOldestFirst(t *testing.T) {
	mk := func(id string, stopped int64) heldSession {
		return heldSession{cl: &mochi.Client{ID: id}, stopped: stopped}
	}
	h := []heldSession{mk("c", 300), mk("b", 100), mk("z", 200), mk("a", 200)}
	sortHeld(h)
	var got []string
	for _, x := range h {
		got = append(got, x.cl.ID)
	}
	if diff := cmp.Diff([]string{"b", "a", "z", "c"}, got); diff != "" {
		t.Errorf("order (-want +got):\n%s", diff)
	}
}

// TestQoS0CommandToDisconnectedEvictsNothing: with all sessions holding
// as much as they may, a command that reaches a disconnected device at
// QoS 0 (its subscription is QoS 0), which its session does not keep,
// drops no other device's held commands to make room for nothing.
func TestQoS0CommandToDisconnectedEvictsNothing(t *testing.T) {
	const budget = 16 << 10
	fit := int(budget / heldPer("off1"))
	total := int64(fit)*heldPer("off1") + heldPer("q0")/2
	r := newRigWith(t, queue.Options{}, Config{MaxHeldBytes: budget, MaxHeldBytesTotal: total}, nil)
	r.leave(t, r.dialKept(t, "off1"))
	for i := range fit {
		if !r.command(t, "off1", i) {
			t.Fatalf("command %d not held for the disconnected session of off1", i)
		}
	}
	held := r.session(t, "off1").HeldBytes()
	q0 := r.resume(t, "q0")
	q0.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: bridges.TopicPrefix("q0") + "c/#", Qos: 0}}})
	if pk := q0.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("got packet type %d, want the SUBACK", pk.FixedHeader.Type)
	}
	r.leave(t, q0)
	for i := range 5 {
		r.command(t, "q0", i)
	}
	if got := r.refusals(hub.ReasonCommandsEvicted); got != 0 {
		t.Errorf("commands_evicted %v for commands a disconnected QoS 0 session does not keep, want 0", got)
	}
	if got := r.session(t, "off1").HeldBytes(); got != held {
		t.Errorf("off1 holds %d bytes after commands to q0, want its %d", got, held)
	}
}

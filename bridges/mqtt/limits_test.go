package mqtt

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// TestTopicAliasRefused: the gateway allows no topic aliases (mochi's
// default allowed 65535 per session without announcing it). An MQTT 5
// PUBLISH that sets one ends the session with DISCONNECT 0x94, is counted
// and does not reach the queue.
func TestTopicAliasRefused(t *testing.T) {
	r := newRig(t, queue.Options{})
	before := r.refusals(hub.ReasonTopicAlias)
	d := r.dial(t, "deva", 5)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1,
		TopicName: "devices/deva/t/x", Payload: []byte("1"), Properties: packets.Properties{TopicAlias: 1, TopicAliasFlag: true}})
	pk, err := d.readErr(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrTopicAliasInvalid.Code {
		t.Fatalf("got packet type %d reason %#x (%v), want DISCONNECT 0x94", pk.FixedHeader.Type, pk.ReasonCode, err)
	}
	d.closed()
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
	if got := r.refusals(hub.ReasonTopicAlias) - before; got != 1 {
		t.Errorf("topic_alias refusals %v, want 1", got)
	}
	if ents := r.queued(t); len(ents) != 0 {
		t.Errorf("queue holds %d messages, want none", len(ents))
	}
}

// queued returns the payloads the queue holds, without waiting.
func (r *rig) queued(t *testing.T) []string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // what is there now, no wait
	ents, err := r.q.Next(ctx, 0, 100)
	if err != nil && ctx.Err() == nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, string(e.Payload))
	}
	return out
}

// TestRetainedCapPerDevice: a device may hold retained messages on at most
// MaxRetained topics. A retained publish on one more topic is refused
// whole (MQTT 5 QoS 1: PUBACK 0x97; QoS 0: dropped), counted as
// retained_limit, and reaches neither the queue nor the retained store;
// replacing or clearing a retained topic is always allowed and clearing
// makes room. A retained Will on one more topic is dropped likewise.
func TestRetainedCapPerDevice(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{MaxRetained: 2}, nil)
	d := r.dial(t, "deva", 5)
	var id uint16
	retain := func(topic, payload string) byte {
		t.Helper()
		id++
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
			TopicName: "devices/deva/s/" + topic, Payload: []byte(payload)})
		pk := d.read(5 * time.Second)
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != id {
			t.Fatalf("retain %s: got packet type %d id %d, want PUBACK %d", topic, pk.FixedHeader.Type, pk.PacketID, id)
		}
		return pk.ReasonCode
	}
	before := r.refusals(hub.ReasonRetainedLimit)
	steps := []struct {
		topic, payload string
		want           byte
	}{
		{"a", "a1", 0},
		{"b", "b1", 0},
		{"c", "refused-c", 0x97}, // a third topic
		{"a", "a2", 0},           // replacing one
		{"b", "", 0},             // clearing one
		{"c", "c1", 0},           // makes room
	}
	for _, s := range steps {
		if got := retain(s.topic, s.payload); got != s.want {
			t.Errorf("retain %q on %s: PUBACK %#x, want %#x", s.payload, s.topic, got, s.want)
		}
	}
	// QoS 0 has no PUBACK: the PINGRESP after it says it was handled.
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: "devices/deva/s/d", Payload: []byte("refused-d")})
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Pingresp {
		t.Fatalf("got packet type %d, want PINGRESP", pk.FixedHeader.Type)
	}
	if got := r.refusals(hub.ReasonRetainedLimit) - before; got != 2 {
		t.Errorf("retained_limit refusals %v, want 2", got)
	}
	got := map[string]string{}
	for _, tp := range []string{"a", "b", "c", "d"} {
		if p, ok := r.s.Retained("devices/deva/s/" + tp); ok {
			got[tp] = string(p)
		}
	}
	if diff := cmp.Diff(map[string]string{"a": "a2", "c": "c1"}, got); diff != "" {
		t.Errorf("retained (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"a1", "b1", "a2", "", "c1"}, r.queued(t)); diff != "" {
		t.Errorf("queue (-want +got):\n%s", diff)
	}

	// A retained Will on a third topic, due when the connection drops.
	w := r.dialTLS(t, "deva", 5, true)
	if pk := w.connectWill(packets.ConnectParams{WillTopic: "devices/deva/s/online", WillPayload: []byte("refused-will"), WillRetain: true, WillQos: 1}); pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	d.closed() // taken over
	waitFor(t, "the new session", func() bool { return r.s.SessionCount() == 1 })
	w.c.Close()
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
	if got := r.refusals(hub.ReasonRetainedLimit) - before; got != 3 {
		t.Errorf("retained_limit refusals %v after the Will, want 3", got)
	}
	if _, ok := r.s.Retained("devices/deva/s/online"); ok {
		t.Error("the Will over the cap is retained")
	}
	if n := len(r.queued(t)); n != 5 {
		t.Errorf("queue holds %d messages after the Will, want 5", n)
	}
}

// TestRetainedCapRefusalsDoNotFloodTheLog: retained publishes past the cap
// of topics, sent in a loop, are each counted (retained_limit) and logged
// once or twice (one line per device and kind per 10 s). Before, each had
// a line of its own.
func TestRetainedCapRefusalsDoNotFloodTheLog(t *testing.T) {
	lb := &logbuf.Buffer{}
	r := newRigClock(t, queue.Options{}, Config{MaxRetained: 1}, nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
	d := r.dial(t, "deva", 5)
	const n = 50
	for i := range n + 1 {
		id := uint16(i + 1)
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
			TopicName: fmt.Sprintf("devices/deva/s/t%d", i), Payload: []byte("1")})
		want := packets.ErrQuotaExceeded.Code
		if i == 0 {
			want = 0 // the one topic the cap allows
		}
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Puback || pk.PacketID != id || pk.ReasonCode != want {
			t.Fatalf("retained publish %d: type %d id %d reason %#x, want PUBACK %d %#x", i, pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode, id, want)
		}
	}
	if got := r.refusals(hub.ReasonRetainedLimit); got != n {
		t.Errorf("retained_limit refusals %v, want %d", got, n)
	}
	if got := len(lb.Lines("mqtt: publish refused: too many retained topics", "device=deva")); got < 1 || got > 2 {
		t.Errorf("%d log lines for %d refusals, want 1 or 2 (one per 10 s)", got, n)
	}
}

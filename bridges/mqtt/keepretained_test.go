package mqtt

import (
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/queue"
)

// fwOptOut is a KeepRetained that refuses the firmware status topics
// while on is set, as the gateway's does for the firmware.status opt-out.
func fwOptOut(on *atomic.Bool) func(string) bool {
	return func(topic string) bool { return !on.Load() || !strings.HasSuffix(topic, "/s/fw") }
}

// retainPublish publishes payload retained on the device's topic and
// checks the PUBACK is success.
func (d *device) retainPublish(id uint16, topic, payload string) {
	d.t.Helper()
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
		TopicName: "devices/" + d.id + "/" + topic, Payload: []byte(payload)})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Puback || pk.ReasonCode != 0 {
		d.t.Fatalf("%s retains %s: packet type %d reason %#x, want PUBACK 0", d.id, topic, pk.FixedHeader.Type, pk.ReasonCode)
	}
}

// TestKeepRetainedOptOut: with the firmware.status opt-out on, a device's
// retained firmware status report is taken (PUBACK success, handed on)
// but neither the broker nor the store keeps it; switching the opt-out on
// drops the ones kept before (DropRetainedNotKept) and nothing else; an
// empty retained publish still clears. The retain hook stored a retained
// devices/{id}/s/fw whatever the opt-out said, and the broker kept its
// copy in memory.
func TestKeepRetainedOptOut(t *testing.T) {
	var on atomic.Bool
	st := newCountingStore()
	r := newRigWith(t, queue.Options{}, Config{Retained: st, KeepRetained: fwOptOut(&on)}, nil)
	d := r.dial(t, "fw1", 5)
	d.retainPublish(1, "s/fw", "v1")
	d.retainPublish(2, "s/online", "1")
	if topics, _ := st.held(); len(topics) != 2 {
		t.Fatalf("before the opt-out the store holds %v, want both", topics)
	}

	on.Store(true)
	n, err := r.s.DropRetainedNotKept()
	if err != nil || n != 1 {
		t.Errorf("DropRetainedNotKept() = %d, %v; want 1", n, err)
	}
	want := []string{"devices/fw1/s/online"}
	check := func(when string) {
		t.Helper()
		if topics, _ := st.held(); !slices.Equal(topics, want) {
			t.Errorf("%s: store holds %v, want %v", when, topics, want)
		}
		var inBroker []string
		for _, pk := range r.s.mq.Topics.Messages("devices/#") {
			inBroker = append(inBroker, pk.TopicName)
		}
		if !slices.Equal(inBroker, want) {
			t.Errorf("%s: broker retains %v, want %v", when, inBroker, want)
		}
	}
	check("after the drop")

	d.retainPublish(3, "s/fw", "v2")
	check("after a retained report with the opt-out on")

	// A report retained by the broker while the opt-out switched on (the
	// publish found it off): the retain hook neither stores nor keeps it.
	h := &retainHook{st: st, log: slog.New(slog.NewTextHandler(io.Discard, nil)), s: r.s}
	pk := packets.Packet{TopicName: "devices/fw1/s/fw", Payload: []byte("v3"), FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}}
	h.OnRetainMessage(&mochi.Client{ID: "fw1"}, pk, r.s.mq.Topics.RetainMessage(pk))
	check("after the retain hook saw a report")

	// Stored (by an older version): not loaded while refused, and not
	// deleted at load (unreadable opt-outs refuse it too and erase nothing).
	st.mu.Lock()
	st.m["devices/fw1/s/fw"] = st.m["devices/fw1/s/online"]
	st.mu.Unlock()
	got, err := h.StoredRetainedMessages()
	if err != nil || len(got) != 1 || got[0].TopicName != "devices/fw1/s/online" {
		t.Errorf("loaded %v, %v; want only devices/fw1/s/online", got, err)
	}
	st.mu.Lock()
	_, ok := st.m["devices/fw1/s/fw"]
	delete(st.m, "devices/fw1/s/fw")
	st.mu.Unlock()
	if !ok {
		t.Error("the refused stored report was deleted at load")
	}

	on.Store(false)
	d.retainPublish(4, "s/fw", "v4")
	d.retainPublish(5, "s/fw", "")
	check("after a report retained and cleared with the opt-out off")
}

// TestKeepRetainedPublishAndWill: a retained publish or Will on a topic
// KeepRetained refuses is taken and sent on, not retained: the broker
// keeps no copy (here with no store, whose retain hook would catch the
// broker's copy too).
func TestKeepRetainedPublishAndWill(t *testing.T) {
	var on atomic.Bool
	on.Store(true)
	r := newRigWith(t, queue.Options{}, Config{KeepRetained: fwOptOut(&on)}, nil)
	r.dial(t, "fw3", 5).retainPublish(1, "s/fw", "v1")
	if p, ok := r.s.Retained("devices/fw3/s/fw"); ok {
		t.Errorf("the broker retains the report %q", p)
	}

	topic := "devices/fw2/s/fw"
	sub := r.inlineSub(t, "devices/fw2/s/#")
	d := r.dialTLS(t, "fw2", 5, true)
	if pk := d.connectWill(packets.ConnectParams{WillTopic: topic, WillPayload: []byte("failed"), WillQos: 1, WillRetain: true}); pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	waitFor(t, "the session", func() bool { return r.s.SessionCount() == 2 })
	d.c.Close()
	select {
	case m := <-sub:
		if m != topic+" failed" {
			t.Errorf("subscriber got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the Will was not published within 5 s")
	}
	if p, ok := r.s.Retained(topic); ok {
		t.Errorf("the broker retains the Will %q", p)
	}
}

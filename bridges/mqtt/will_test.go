package mqtt

import (
	"bytes"
	"context"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

func (r *rig) refusals(reason string) float64 {
	return testutil.ToFloat64(r.hub.Metrics().Refused.WithLabelValues(hub.MQTT, reason))
}

// connectWill sends a CONNECT with a Will and returns the server's answer.
func (d *device) connectWill(will packets.ConnectParams) packets.Packet {
	d.t.Helper()
	cp := will
	cp.ProtocolName, cp.Clean, cp.Keepalive, cp.ClientIdentifier, cp.WillFlag = []byte("MQTT"), true, 60, d.id, true
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: d.ver, Connect: cp})
	return d.read(5 * time.Second)
}

// closed reads until the connection ends and fails if it does not within
// 5 s or if anything but a DISCONNECT comes first.
func (d *device) closed() {
	d.t.Helper()
	for {
		pk, err := d.readErr(5 * time.Second)
		if isTimeout(err) {
			d.t.Fatalf("device %s: connection still open after 5 s", d.id)
		}
		if err != nil {
			return
		}
		if pk.FixedHeader.Type != packets.Disconnect {
			d.t.Fatalf("device %s: got packet type %d (reason %#x) before the connection closed", d.id, pk.FixedHeader.Type, pk.ReasonCode)
		}
	}
}

// inlineSub collects what the broker publishes on filter.
func (r *rig) inlineSub(t *testing.T, filter string) <-chan string {
	t.Helper()
	ch := make(chan string, 16)
	cancel, err := r.s.Subscribe(filter, func(topic string, payload []byte) {
		if topic[0] == '$' {
			return // the broker's own statistics
		}
		select {
		case ch <- topic + " " + string(payload):
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	return ch
}

// TestWillOutsideNamespaceRefusedAtConnect: a CONNECT whose Will the device
// could not publish (another device's command topic, the broadcast tree,
// its own command tree, a payload over the limit) gets CONNACK 0x87 (MQTT
// 3.1.1: 0x05), not the 0x86 of bad credentials, and nothing after it; the
// refusal is counted under the reason a publish would have.
func TestWillOutsideNamespaceRefusedAtConnect(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{MaxPayload: 64}, nil)
	big := bytes.Repeat([]byte("x"), 65)
	for _, tc := range []struct {
		name    string
		ver     byte
		topic   string
		payload []byte
		retain  bool
		code    byte
		reason  string
	}{
		{"other device's command", 5, "devices/devb/c/unlock", []byte("1"), false, 0x87, hub.ReasonPublishACL},
		{"other device's command, 3.1.1", 4, "devices/devb/c/unlock", []byte("1"), false, 0x05, hub.ReasonPublishACL},
		{"broadcast tree, retained", 5, "bastion/broadcast/fw", []byte("evil"), true, 0x87, hub.ReasonPublishACL},
		{"own command tree", 5, "devices/deva/c/x", []byte("1"), false, 0x87, hub.ReasonPublishACL},
		{"own telemetry, too large", 5, "devices/deva/t/x", big, false, 0x87, hub.ReasonTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub := r.inlineSub(t, "#")
			before := r.refusals(tc.reason)
			d := r.dialTLS(t, "deva", tc.ver, true)
			pk := d.connectWill(packets.ConnectParams{WillTopic: tc.topic, WillPayload: tc.payload, WillRetain: tc.retain, WillQos: 1})
			if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != tc.code {
				t.Fatalf("got packet type %d reason %#x, want CONNACK %#x", pk.FixedHeader.Type, pk.ReasonCode, tc.code)
			}
			d.closed()
			if got := r.refusals(tc.reason) - before; got != 1 {
				t.Errorf("%s refusals counted %v, want 1", tc.reason, got)
			}
			if _, ok := r.s.Retained(tc.topic); ok {
				t.Errorf("a message is retained on %s", tc.topic)
			}
			select {
			case m := <-sub:
				t.Errorf("broker published %q", m)
			default:
			}
		})
	}
}

// willRewriter stands for anything that sets a Will the CONNECT check did
// not see: it rewrites the Will's topic after mochi parsed the CONNECT
// (its OnConnect runs after the gateway's, on the session's goroutine).
type willRewriter struct {
	mochi.HookBase
	topic string
}

func (h *willRewriter) ID() string { return "test-will-rewriter" }
func (h *willRewriter) Provides(b byte) bool {
	return b == mochi.OnConnect
}
func (h *willRewriter) OnConnect(cl *mochi.Client, _ packets.Packet) error {
	cl.Properties.Will.TopicName = h.topic
	cl.Properties.Will.Retain = true
	return nil
}

// TestWillCheckedAgainWhenSent: mochi publishes a Will without asking the
// ACL, so a Will outside the namespace that got past CONNECT is refused
// when it would be sent: counted, not published, not retained.
func TestWillCheckedAgainWhenSent(t *testing.T) {
	r := newRig(t, queue.Options{})
	if err := r.s.mq.AddHook(&willRewriter{topic: "devices/devb/c/unlock"}, nil); err != nil {
		t.Fatal(err)
	}
	sub := r.inlineSub(t, "devices/devb/c/#")
	before := r.refusals(hub.ReasonPublishACL)
	d := r.dialTLS(t, "deva", 5, true)
	if pk := d.connectWill(packets.ConnectParams{WillTopic: "devices/deva/s/online", WillPayload: []byte("0"), WillQos: 1}); pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	waitFor(t, "the session", func() bool { return r.s.SessionCount() == 1 })
	d.c.Close() // no DISCONNECT: the Will is due
	// The session leaves the gauge only after mochi's sendLWT returned.
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
	select {
	case m := <-sub:
		t.Errorf("device B's command topic got %q from device A's Will", m)
	default:
	}
	if got := r.refusals(hub.ReasonPublishACL) - before; got != 1 {
		t.Errorf("publish_outside_namespace refusals %v, want 1", got)
	}
	if _, ok := r.s.Retained("devices/devb/c/unlock"); ok {
		t.Error("the refused Will is retained")
	}
}

// TestWillInOwnNamespaceIsAPublish: a Will on the device's own status tree
// is what a retained publish by the device would be, at the moment the
// connection drops (its Will Delay Interval is not waited for): in the
// durable queue (the Sink), retained in the broker, and delivered to
// subscribers.
func TestWillInOwnNamespaceIsAPublish(t *testing.T) {
	r := newRig(t, queue.Options{})
	topic := "devices/deva/s/online"
	sub := r.inlineSub(t, "devices/deva/s/#")
	d := r.dialTLS(t, "deva", 5, true)
	pk := d.connectWill(packets.ConnectParams{WillTopic: topic, WillPayload: []byte("offline"), WillQos: 1, WillRetain: true,
		WillProperties: packets.Properties{WillDelayInterval: 3600}})
	if pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	waitFor(t, "the session", func() bool { return r.s.SessionCount() == 1 })
	d.c.Close()
	select {
	case m := <-sub:
		if m != topic+" offline" {
			t.Errorf("subscriber got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the Will was not published within 5 s")
	}
	if p, ok := r.s.Retained(topic); !ok || string(p) != "offline" {
		t.Errorf("retained %q %v, want offline", p, ok)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ents, err := r.q.Next(ctx, 0, 10)
	if err != nil {
		t.Fatalf("queue: %v", err)
	}
	if len(ents) != 1 || ents[0].Device != "deva" || ents[0].Topic != topic || string(ents[0].Payload) != "offline" {
		t.Errorf("queue holds %+v, want the Will", ents)
	}
}

package mqtt

import (
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// TestRetainRateBucket: a device gets burst writes at once, then one per
// interval; devices have buckets of their own.
func TestRetainRateBucket(t *testing.T) {
	r := newRetainRate(3, time.Second)
	t0 := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var got []bool
	for _, at := range []time.Duration{0, 0, 0, 0, 999 * time.Millisecond, time.Second, time.Second, 5 * time.Second, 5 * time.Second, 5 * time.Second, 5 * time.Second} {
		got = append(got, r.allow(t0.Add(at), "deva"))
	}
	want := []bool{true, true, true, false, false, true, false, true, true, true, false}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("deva's writes allowed %v, want %v", got, want)
	}
	if !r.allow(t0, "devb") {
		t.Error("devb's first write refused: deva's bucket is not devb's")
	}
}

// TestRetainRateForgetsFullBuckets: a device whose bucket is full again
// needs no entry, and the entries are dropped: 10,000 devices writing once
// each, 100 a second, keep the map to a few hundred entries, not 10,000.
func TestRetainRateForgetsFullBuckets(t *testing.T) {
	r := newRetainRate(3, time.Second)
	t0 := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	most := 0
	for i := range 10000 {
		if !r.allow(t0.Add(time.Duration(i)*10*time.Millisecond), fmt.Sprintf("dev%d", i)) {
			t.Fatalf("dev%d's first write refused", i)
		}
		most = max(most, len(r.tat))
	}
	if most > 256 {
		t.Errorf("the rate held %d devices at once, want at most 256 (those that wrote within the last second, about 100, and up to as many again before a sweep)", most)
	}
}

// TestRetainedWritesRateLimited: a device that replaces a retained
// message in a loop gets RetainedBurst writes at once, then one per
// RetainedEvery; past that a retained publish is refused whole, as a full
// queue is: MQTT 5 QoS 1 gets PUBACK 0x97, QoS 0 is dropped, and an MQTT
// 3.1.1 QoS 1 publish, which has no negative PUBACK, closes the session
// so that the device sends it again after reconnecting. Each is counted
// as retained_rate and logged, spaced, with the device. The bucket is the
// device's: a new session does not refill it, and another device has its
// own. An empty retained publish on a topic that holds none (which writes
// nothing) and a publish without retain do not count. Before, each
// replacement was a synced store write, as fast as the device sent them.
func TestRetainedWritesRateLimited(t *testing.T) {
	for _, ver := range []byte{5, 4} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			var mu sync.Mutex
			now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
			clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
			advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }
			st := newCountingStore()
			lb := &logbuf.Buffer{}
			r := newRigClock(t, queue.Options{}, Config{Retained: st, Now: clock, RetainedBurst: 3, RetainedEvery: time.Second},
				nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
			d := r.dial(t, "deva", ver)
			var id uint16
			// retain publishes a retained QoS 1 message on d and returns its
			// PUBACK's reason, or -1 if the session was closed instead.
			retain := func(d *device, topic, payload string) int {
				t.Helper()
				id++
				d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
					TopicName: "devices/" + d.id + "/s/" + topic, Payload: []byte(payload)})
				pk, err := d.readErr(5 * time.Second)
				if isTimeout(err) {
					t.Fatalf("retain %q on %s: no answer, and the session is open", payload, topic)
				}
				if err != nil {
					return -1
				}
				if pk.FixedHeader.Type != packets.Puback || pk.PacketID != id {
					t.Fatalf("retain %q on %s: got packet type %d id %d, want PUBACK %d", payload, topic, pk.FixedHeader.Type, pk.PacketID, id)
				}
				return int(pk.ReasonCode)
			}
			refused := int(packets.ErrQuotaExceeded.Code)
			if ver == 4 {
				refused = -1
			}
			for i := range 3 {
				if got := retain(d, "state", fmt.Sprint(i)); got != 0 {
					t.Fatalf("retained write %d of a burst of 3: %#x, want PUBACK 0", i, got)
				}
			}
			if got := retain(d, "state", "over"); got != refused {
				t.Fatalf("fourth retained write at once: %d, want %d", got, refused)
			}
			if got := r.refusals(hub.ReasonRetainedRate); got != 1 {
				t.Errorf("retained_rate refusals %v, want 1", got)
			}
			if ver == 4 {
				d = r.dial(t, "deva", ver) // the device reconnects to send it again
			}
			// A new session has the device's bucket, still empty.
			if got := retain(d, "state", "again"); got != refused {
				t.Fatalf("retained write from a new session: %d, want %d (the bucket is the device's)", got, refused)
			}
			if ver == 4 {
				d = r.dial(t, "deva", ver)
			}
			// Nothing that writes nothing is refused or counted.
			if got := retain(d, "new", ""); got != 0 {
				t.Errorf("empty retained publish on a topic that holds none: %#x, want PUBACK 0", got)
			}
			d.publish(100, 1)
			if a := d.readAcks(1); a[0] != (ack{packets.Puback, 100, 0}) {
				t.Errorf("publish without retain: %+v, want PUBACK 100 0", a[0])
			}
			// QoS 0 has no PUBACK: the PINGRESP after it says it was handled.
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: "devices/deva/s/state", Payload: []byte("qos0")})
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
			if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Pingresp {
				t.Fatalf("got packet type %d, want PINGRESP", pk.FixedHeader.Type)
			}
			if got := r.refusals(hub.ReasonRetainedRate); got != 3 {
				t.Errorf("retained_rate refusals %v, want 3", got)
			}
			if topics, writes := st.held(); len(topics) != 1 || writes != 3 {
				t.Errorf("store holds %v after %d writes, want devices/deva/s/state after 3", topics, writes)
			}
			if p, _ := r.s.Retained("devices/deva/s/state"); string(p) != "2" {
				t.Errorf("retained on devices/deva/s/state: %q, want the last one allowed, 2", p)
			}
			// Another device has a bucket of its own.
			b := r.dial(t, "devb", ver)
			if got := retain(b, "state", "b"); got != 0 {
				t.Errorf("devb's first retained write: %#x, want PUBACK 0", got)
			}
			// One more write per interval.
			advance(time.Second)
			if got := retain(d, "state", "later"); got != 0 {
				t.Errorf("retained write a second later: %#x, want PUBACK 0", got)
			}
			if got := retain(d, "state", "later-over"); got != refused {
				t.Errorf("second retained write a second later: %d, want %d", got, refused)
			}
			if got := r.refusals(hub.ReasonRetainedRate); got != 4 {
				t.Errorf("retained_rate refusals %v, want 4", got)
			}
			const line = "mqtt: publish refused: retained messages written too often"
			if got := len(lb.Lines(line, "device=deva")); got < 1 || got > 2 {
				t.Errorf("%d log lines for 4 refusals of deva, want 1 or 2 (one per 10 s)", got)
			}
		})
	}
}

// TestRetainedWillRateLimited: a retained Will is a retained write like a
// publish: past the device's rate it is dropped (as past the cap of
// topics), counted as retained_rate, and neither retained nor stored.
func TestRetainedWillRateLimited(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	st := newCountingStore()
	r := newRigWith(t, queue.Options{}, Config{Retained: st, Now: func() time.Time { return now }, RetainedBurst: 1, RetainedEvery: time.Hour}, nil)
	d := r.dial(t, "deva", 5)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: 1,
		TopicName: "devices/deva/s/state", Payload: []byte("on")})
	if a := d.readAcks(1); a[0] != (ack{packets.Puback, 1, 0}) {
		t.Fatalf("first retained write: %+v, want PUBACK 1 0", a[0])
	}
	w := r.dialTLS(t, "deva", 5, true)
	if pk := w.connectWill(packets.ConnectParams{WillTopic: "devices/deva/s/online", WillPayload: []byte("no"), WillRetain: true, WillQos: 1}); pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	d.closed() // taken over
	w.c.Close()
	waitFor(t, "the Will's refusal", func() bool { return r.refusals(hub.ReasonRetainedRate) == 1 })
	if _, ok := r.s.Retained("devices/deva/s/online"); ok {
		t.Error("the Will past the rate is retained")
	}
	if topics, writes := st.held(); len(topics) != 1 || writes != 1 {
		t.Errorf("store holds %v after %d writes, want devices/deva/s/state after 1", topics, writes)
	}
}

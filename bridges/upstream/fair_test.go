package upstream

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// gateLink is a link with cfg in front of q, not running: for what its
// admission (gate) and its PUBACK handling decide.
func gateLink(t *testing.T, cfg Config, q Source) *Upstream {
	t.Helper()
	rs, err := cfg.compile()
	if err != nil {
		t.Fatal(err)
	}
	u := &Upstream{log: testLog(), q: q, m: newMetrics(), lines: ratelog.New(time.Minute)}
	u.cur.Store(&snapshot{cfg: cfg, routes: rs})
	return u
}

func openQueue(t *testing.T) *queue.Queue {
	t.Helper()
	q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// TestTopicBeyondLimitsRefusedAtAdmission: a message whose upstream topic
// is beyond upstream.max_topic_levels or max_topic_length is refused to its
// device (bridges.ErrTopicRefused, which the transports answer as a bad
// topic), counted, and nothing is stored. It used to be acknowledged,
// queued, and found unsendable only when due: parked (one device could
// fill the parking queue with such messages, then hold its own messages
// behind the one that did not fit). A message a privacy rule keeps local
// is withheld, as before, whatever its upstream topic.
func TestTopicBeyondLimitsRefusedAtAdmission(t *testing.T) {
	q := openQueue(t)
	cfg := validConfig()
	cfg.MaxTopicLevels, cfg.MaxTopicLength = 7, 40
	cfg.Forward = append([]Rule{{Topic: "devices/+/t/local/#", Action: ActionLocal}}, cfg.Forward...)
	u := gateLink(t, cfg, q)
	p := startParkingQueue(t, t.TempDir())
	u.SetParking(p)
	ctx := context.Background()

	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}                    // bastion/gw1/deep/t/a/b/c/d: 8 levels
	long := bridges.Message{Device: "long", Topic: "devices/long/t/" + strings.Repeat("x", 30), QoS: 1, Payload: []byte(`{}`)} // 47 bytes upstream
	accepts := map[string]func(bridges.Message) error{
		"Accept": func(m bridges.Message) error { return u.Accept(ctx, m) },
		"AcceptAsync": func(m bridges.Message) error {
			_, err := u.AcceptAsync(ctx, m)
			return err
		},
		"AcceptNotify": func(m bridges.Message) error {
			_, err := u.AcceptNotify(ctx, m, func(error) {})
			return err
		},
	}
	for name, accept := range accepts {
		for _, m := range []bridges.Message{deep, long} {
			err := accept(m)
			if !errors.Is(err, bridges.ErrTopicRefused) {
				t.Errorf("%s of %s: %v, want bridges.ErrTopicRefused", name, m.Topic, err)
			}
		}
	}
	if err := accepts["Accept"](deep); err == nil || !strings.Contains(err.Error(), `"bastion/gw1/deep/t/a/b/c/d" has 8 levels, more than upstream.max_topic_levels 7`) {
		t.Errorf("refusal %v, want the upstream topic and the limit", err)
	}
	local := bridges.Message{Device: "deep", Topic: "devices/deep/t/local/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	if err := u.Accept(ctx, local); err != nil {
		t.Errorf("Accept of a message a rule keeps local: %v, want nil (withheld)", err)
	}
	if err := u.Accept(ctx, telemetry("a", 1)); err != nil {
		t.Fatalf("Accept of a message within the limits: %v", err)
	}
	if d, pd := q.Stats().Depth, p.Stats().Depth; d != 1 || pd != 0 {
		t.Errorf("queued %d, parked %d; want 1 (the message within the limits), 0", d, pd)
	}
	if n := testutil.ToFloat64(u.m.refused.WithLabelValues("topic_too_deep")); n != 4 {
		t.Errorf("bastion_upstream_refused_total{reason=topic_too_deep} = %v, want 4", n)
	}
	if n := testutil.ToFloat64(u.m.refused.WithLabelValues("topic_too_long")); n != 3 {
		t.Errorf("bastion_upstream_refused_total{reason=topic_too_long} = %v, want 3", n)
	}
}

// TestStalledDeviceRefused: a device's message can be neither sent nor
// parked (its topic is beyond the limits, queued before a reload lowered
// them, and the parking queue is full), so it stays at the head of the
// queue and the device's later messages wait behind it. The device's new
// messages are refused as a full queue (bridges.ErrQueueFull: retry later)
// and counted, where they used to be queued behind it without bound; other
// devices' are taken and sent. Once the message is parked (the operator
// dropped the parked ones) the device is taken again.
func TestStalledDeviceRefused(t *testing.T) {
	fb := closingBroker(t)
	dir := t.TempDir()
	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{"pad":"` + strings.Repeat("x", 1500) + `"}`)}
	queueBefore(t, dir, deep, telemetry("deep", 1))
	cfg := fb.config(t)
	cfg.MaxTopicLevels = 7
	cfg.BackoffMax = time.Hour // no retry on the timer: room comes from the drop
	p := fullParking(t, deep)
	l := startLinkWith(t, cfg, dir, func(u *Upstream) { u.SetParking(p) })
	waitFor(t, "the deep message stalled", 10*time.Second, func() bool { return l.up.stalls.has("deep") })
	ctx := context.Background()
	for i := range 3 {
		if err := l.up.Accept(ctx, telemetry("deep", 2+i)); !errors.Is(err, bridges.ErrQueueFull) {
			t.Fatalf("Accept of the stalled device's new message: %v, want bridges.ErrQueueFull", err)
		}
	}
	if err := l.up.Accept(ctx, telemetry("good", 1)); err != nil {
		t.Fatalf("Accept of another device's message: %v", err)
	}
	expectAcked(t, fb, l, "bastion/gw1/good/t/n")
	waitFor(t, "queue depth 2: the stalled message and the one behind it", 10*time.Second, func() bool { return l.q.Stats().Depth == 2 })
	if v := metricLabel(t, l, "bastion_upstream_refused_total", "device_stalled"); v != 3 {
		t.Errorf("bastion_upstream_refused_total{reason=device_stalled} = %v, want 3", v)
	}

	if n, err := l.up.DropParked(ctx); err != nil || n == 0 {
		t.Fatalf("DropParked = %d, %v; want the fillers dropped", n, err)
	}
	expectAcked(t, fb, l, "bastion/gw1/deep/t/n")
	if l.up.stalls.has("deep") {
		t.Fatal("deep still stalled after its message was parked and the next one sent")
	}
	if err := l.up.Accept(ctx, telemetry("deep", 9)); err != nil {
		t.Fatalf("Accept of deep's message once its stalled one was parked: %v", err)
	}
	waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
}

// TestStallEndsOnceReadPast: a device an earlier run stalled is stalled
// no more once a later run has read past its stalled message without
// stalling on it again, whether it sent, parked or withheld it or did not
// find it (the queue dropped it as unreadable): otherwise a device with
// nothing else queued would be refused for good. A stall the current run
// found stays, whatever it reads past.
func TestStallEndsOnceReadPast(t *testing.T) {
	var s stalledDevices
	r0, r1 := &sendRun{}, &sendRun{}
	s.add("gone", r0, 10)
	s.add("later", r0, 50)
	s.add("again", r0, 12)
	s.add("again", r1, 12)
	s.passed(r1, 20)
	for dev, want := range map[string]bool{"gone": false, "later": true, "again": true} {
		if got := s.has(dev); got != want {
			t.Errorf("after reading to 20: %s stalled %v, want %v", dev, got, want)
		}
	}
	s.passed(r1, 60)
	if s.has("later") || !s.has("again") {
		t.Errorf("after reading to 60: later stalled %v, again %v; want false (an earlier run's stall), true (this run's)", s.has("later"), s.has("again"))
	}
}

// TestRefusedForGoodNotParkedStallsOnlyItsDevice: the broker refuses x's
// message for good (PUBACK 0x87) and the parking queue is full. The
// message stays queued and x's messages wait behind it, while a's flow on
// the same run, with no pause. It used to end the run as a retried refusal
// does: the whole link paused, up to backoff_max (an hour here), and every
// run started again at the same message.
func TestRefusedForGoodNotParkedStallsOnlyItsDevice(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) {
		b.autoAck = true
		b.script = func(c *fakeConn, p *packets.Publish) fakeAnswer {
			if strings.HasPrefix(p.Topic, "bastion/gw1/x/") {
				return fakeAnswer{puback: 0x87}
			}
			return fakeAnswer{}
		}
	})
	dir := t.TempDir()
	queueBefore(t, dir, telemetry("x", 1), telemetry("x", 2), telemetry("a", 1))
	cfg := fb.config(t)
	cfg.BackoffMin, cfg.BackoffMax = time.Hour, 2*time.Hour
	p := fullParking(t, telemetry("x", 1))
	l := startLinkWith(t, cfg, dir, func(u *Upstream) { u.SetParking(p) })
	expectAcked(t, fb, l, "bastion/gw1/a/t/n")
	waitFor(t, "the refusal handled", 10*time.Second, func() bool { return strings.Contains(l.up.Status().LastError, "refused seq") })
	// Accepted after the refusal: sent by the same run, not after a pause.
	if err := l.up.Accept(context.Background(), telemetry("a", 2)); err != nil {
		t.Fatal(err)
	}
	expectAcked(t, fb, l, "bastion/gw1/a/t/n")
	if !l.up.stalls.has("x") {
		t.Error("x not stalled")
	}
	waitFor(t, "queue depth 2: x's messages kept", 10*time.Second, func() bool { return l.q.Stats().Depth == 2 })
	if st := l.up.Status(); !strings.Contains(st.LastError, "refused seq") || !strings.Contains(st.LastError, "for good with PUBACK reason 0x87") ||
		!strings.Contains(st.LastError, "it cannot be parked: the parking queue did not take it") ||
		!strings.Contains(st.LastError, "x's later messages wait behind it (order per device) while other devices' messages flow") {
		t.Errorf("LastError %q, want the refusal, why it is not parked, and what waits", st.LastError)
	}
	if err := l.up.Accept(context.Background(), telemetry("x", 3)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Errorf("Accept of x's new message while its refused one waits: %v, want bridges.ErrQueueFull", err)
	}
}

// TestFailedParkKeepsTheBurst: a park that fails (the parking queue full)
// gives back the token it took from the burst. It used to keep it: after
// parkBurst failures the burst was used up with nothing parked, and once
// there was room the next refused message waited up to parkEvery.
func TestFailedParkKeepsTheBurst(t *testing.T) {
	q := openQueue(t)
	u := gateLink(t, validConfig(), q)
	m := telemetry("d1", 1)
	p := fullParking(t, m)
	u.SetParking(p)
	if err := q.Accept(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	es, err := q.Held(0, 1)
	if err != nil || len(es) != 1 {
		t.Fatalf("Held: %v, %v", es, err)
	}
	for range parkBurst + 1 {
		if err := u.park(es[0], "not_authorized", "PUBACK reason 0x87"); err == nil {
			t.Fatal("parked into a full parking queue")
		}
	}
	if n, err := u.DropParked(context.Background()); err != nil || n == 0 {
		t.Fatalf("DropParked = %d, %v", n, err)
	}
	if err := u.park(es[0], "not_authorized", "PUBACK reason 0x87"); err != nil {
		t.Fatalf("park once there is room: %v", err)
	}
}

// TestRetriedParkedIsStampedAnew: a message parked two days ago and retried
// goes back to the main queue as received now. It kept the time its device
// sent it, so at the head of the main queue it was beyond the queue's age
// bound (an hour here): every device's new messages were refused (reason
// age) until it was delivered, and the oldest age reported days.
func TestRetriedParkedIsStampedAnew(t *testing.T) {
	q, err := queue.Open(t.TempDir(), queue.Options{MaxAge: time.Hour}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	u := gateLink(t, validConfig(), q)
	p := startParkingQueue(t, t.TempDir())
	u.SetParking(p)
	old := telemetry("d1", 1)
	old.Received = time.Now().Add(-48 * time.Hour)
	old.Topic += "\x00PUBACK reason 0x87 (not authorized)\x0042"
	if err := p.Accept(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if n, err := u.RetryParked(context.Background()); n != 1 || err != nil {
		t.Fatalf("RetryParked = %d, %v; want 1, nil", n, err)
	}
	if oldest := q.Stats().Oldest; oldest.Before(before) {
		t.Errorf("the retried message is held as received at %s, before the retry (%s)", oldest, before)
	}
	if err := q.Accept(context.Background(), telemetry("d2", 1)); err != nil {
		t.Errorf("Accept after the retry: %v, want nil", err)
	}
}

// TestParkQoS0Durably: a QoS 0 message is parked durably, like any other:
// when the parking queue fails to make it durable (a failed fsync), the
// message stays in the main queue and is not counted parked. It was
// written to the parking queue at its own QoS, whose Accept returns before
// the write: the message was deleted from the main queue and counted
// parked, then lost with the write. Parked, it keeps its QoS 0 for the
// list and the retry.
func TestParkQoS0Durably(t *testing.T) {
	m := telemetry("d1", 1)
	m.QoS = 0
	park := func(t *testing.T, p *queue.Queue) (*Upstream, *queue.Queue, error) {
		t.Helper()
		q := openQueue(t)
		u := gateLink(t, validConfig(), q)
		u.SetParking(p)
		if err := q.Accept(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the QoS 0 message held", 10*time.Second, func() bool { return q.Stats().Depth == 1 })
		es, err := q.Held(0, 1)
		if err != nil || len(es) != 1 {
			t.Fatalf("Held: %v, %v", es, err)
		}
		return u, q, u.park(es[0], "not_authorized", "PUBACK reason 0x87")
	}

	t.Run("fsync fails", func(t *testing.T) {
		var fail atomic.Bool
		p, err := queue.Open(t.TempDir(), queue.Options{Sync: func(f *os.File) error {
			if fail.Load() {
				return errors.New("EIO from the test's disk")
			}
			return f.Sync()
		}}, testLog(), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		fail.Store(true)
		u, q, err := park(t, p)
		if err == nil {
			t.Error("park succeeded though the parking queue's fsync failed")
		}
		if d := q.Stats().Depth; d != 1 {
			t.Errorf("main queue depth %d after the failed park, want 1 (kept)", d)
		}
		if n := testutil.ToFloat64(u.m.parked.WithLabelValues("not_authorized")); n != 0 {
			t.Errorf("counted parked %v, want 0", n)
		}
	})

	t.Run("parked", func(t *testing.T) {
		u, q, err := park(t, startParkingQueue(t, t.TempDir()))
		if err != nil {
			t.Fatal(err)
		}
		ps, err := u.ListParked(context.Background(), 10)
		if err != nil || len(ps.Messages) != 1 || ps.Messages[0].QoS != 0 || ps.Messages[0].Topic != m.Topic || ps.Messages[0].Why != "PUBACK reason 0x87" {
			t.Fatalf("ListParked = %+v, %v; want the QoS 0 message", ps.Messages, err)
		}
		if n, err := u.RetryParked(context.Background()); n != 1 || err != nil {
			t.Fatalf("RetryParked = %d, %v", n, err)
		}
		// Taken at QoS 0: held once written.
		waitFor(t, "the retried message held", 10*time.Second, func() bool { return q.Stats().Depth == 1 })
		es, err := q.Held(0, 1)
		if err != nil || len(es) != 1 || es[0].QoS != 0 || es[0].Topic != m.Topic {
			t.Fatalf("main queue after the retry: %+v, %v; want the QoS 0 message", es, err)
		}
	})
}

// TestRefusalAfterItsRunStallsNoDevice: a permanent refusal that cannot be
// parked, read after its run ended, does not mark its device stalled: the
// next run sends the message again and may have read past it already, so
// nothing would end that stall and the device's messages would be refused
// until another batch came. Within its run it does.
func TestRefusalAfterItsRunStallsNoDevice(t *testing.T) {
	u := gateLink(t, validConfig(), openQueue(t))
	over := &sendRun{u: u, cancel: func() {}, retryAfter: time.Hour}
	over.endRetry()
	over.stallDevice("d1", 5, u.roomMade.Load(), errors.New("refused for good"))
	if u.stalls.has("d1") {
		t.Error("d1 stalled by a run that was over")
	}
	live := &sendRun{u: u, cancel: func() {}, retryAfter: time.Hour}
	live.stallDevice("d1", 5, u.roomMade.Load(), errors.New("refused for good"))
	live.endRetry()
	if !u.stalls.has("d1") {
		t.Error("d1 not stalled by its run")
	}
}

package upstream

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/google/go-cmp/cmp"
)

// startParking gives l a parking queue in dir.
func startParking(t testing.TB, l *link, dir string) *queue.Queue {
	t.Helper()
	p := startParkingQueue(t, dir)
	l.up.SetParking(p)
	return p
}

// parkedLink starts Mosquitto with conf, a cloud subscriber on bastion/#
// (sub is nil when subscribe is false), and a connected link with a parking
// queue.
func parkedLink(t *testing.T, conf string, subscribe bool) (*mosquitto.Broker, *mosquitto.Subscriber, *link, *queue.Queue) {
	t.Helper()
	b := mosquitto.Start(t, mosquitto.Options{Config: conf})
	var sub *mosquitto.Subscriber
	if subscribe {
		sub = mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	}
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	p := startParking(t, l, t.TempDir())
	waitFor(t, "link connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	return b, sub, l, p
}

// acceptAll hands ms to the link.
func acceptAll(t *testing.T, l *link, ms ...bridges.Message) {
	t.Helper()
	for _, m := range ms {
		if err := l.up.Accept(context.Background(), m); err != nil {
			t.Fatalf("Accept %s: %v", m.Topic, err)
		}
	}
}

// expectTopics reads from sub until it has seen every topic in want (in
// that order) and fails on anything else. A topic seen before may come
// again: delivery is at least once, and a broker that closes the connection
// after a refusal (Mosquitto does, for 0x95) makes the link resend what was
// in flight with it.
func expectTopics(t *testing.T, l *link, sub *mosquitto.Subscriber, want ...string) {
	t.Helper()
	seen := map[string]bool{}
	for _, w := range want {
		for got := false; !got; {
			select {
			case p := <-sub.Got:
				switch {
				case p.Topic == w:
					got = true
				case !seen[p.Topic]:
					t.Fatalf("cloud got %s, want %s", p.Topic, w)
				}
				seen[p.Topic] = true
			case <-time.After(10 * time.Second):
				t.Fatalf("%s never arrived; status %+v", w, l.up.Status())
			}
		}
	}
}

// TestParkOversized: Mosquitto refuses a message above its
// message_size_limit (PUBACK 0x95). Without parking that message stays at
// the head of the queue and nothing behind it is ever sent (the old
// behaviour); with parking it moves to the parking queue and the messages
// after it flow.
func TestParkOversized(t *testing.T) {
	_, sub, l, p := parkedLink(t, "message_size_limit 64\n", true)
	ctx := context.Background()
	big := telemetry("big", 1)
	big.Payload = []byte(`{"pad":"` + strings.Repeat("x", 100) + `"}`)
	acceptAll(t, l, telemetry("a", 1), big, telemetry("b", 2))
	expectTopics(t, l, sub, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n")
	waitFor(t, "the oversized message parked", 10*time.Second, parkedOne(l, p))
	waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if got := metric(t, l, "bastion_upstream_parked"); got != 1 {
		t.Errorf("bastion_upstream_parked = %v, want 1", got)
	}
	st := l.up.Status()
	if !strings.Contains(st.LastParked, "0x95") {
		t.Errorf("Status.LastParked = %q, want the 0x95 refusal", st.LastParked)
	}
	ps, err := l.up.ListParked(ctx, 10)
	if err != nil {
		t.Fatalf("ListParked: %v", err)
	}
	if len(ps.Messages) != 1 || ps.Messages[0].Device != "big" || ps.Messages[0].Topic != big.Topic || ps.Messages[0].Bytes != len(big.Payload) || !strings.Contains(ps.Messages[0].Why, "0x95") {
		t.Fatalf("ListParked = %+v, want the big message", ps)
	}
	n, err := l.up.DropParked(ctx)
	if err != nil || n != 1 {
		t.Fatalf("DropParked = %d, %v; want 1, nil", n, err)
	}
	if d := p.Stats().Depth; d != 0 {
		t.Errorf("parking depth %d after drop, want 0", d)
	}
}

// TestParkBeyondMaximumPacketSize: a broker that announces a Maximum Packet
// Size (Mosquitto's max_packet_size) would close the connection on a larger
// PUBLISH, and the link would reconnect and send it again forever. The link
// parks it without sending it, and the connection stays up.
func TestParkBeyondMaximumPacketSize(t *testing.T) {
	b, sub, l, p := parkedLink(t, "max_packet_size 300\n", true)
	big := telemetry("big", 1)
	big.Payload = []byte(`{"pad":"` + strings.Repeat("x", 400) + `"}`)
	acceptAll(t, l, telemetry("a", 1), big, telemetry("b", 2))
	expectTopics(t, l, sub, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n")
	waitFor(t, "the oversized message parked", 10*time.Second, parkedOne(l, p))
	if st := l.up.Status(); !strings.Contains(st.LastParked, "Maximum Packet Size of 300") {
		t.Errorf("Status.LastParked = %q, want the broker's Maximum Packet Size", st.LastParked)
	}
	if c := strings.Count(b.Log(), "as gw1 ("); c != 1 {
		t.Errorf("broker saw %d link connections, want 1 (the oversized PUBLISH must not be sent); log:\n%s", c, b.Log())
	}
}

// TestParkUnauthorizedThenRetry: the broker's ACL refuses one device's topic
// (PUBACK 0x87). That message is parked and the others flow; once the ACL
// allows it, RetryParked sends it.
func TestParkUnauthorizedThenRetry(t *testing.T) {
	acl := filepath.Join(t.TempDir(), "acl")
	writeACL := func(extra string) {
		t.Helper()
		s := "user cloud-sub\ntopic read bastion/#\nuser gw1\ntopic readwrite bastion/gw1/a/#\ntopic read bastion/gw1/+/c/#\n" + extra
		if err := os.WriteFile(acl, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeACL("")
	b, sub, l, p := parkedLink(t, "acl_file "+acl+"\n", true)
	ctx := context.Background()
	acceptAll(t, l, telemetry("a", 1), telemetry("x", 1), telemetry("a", 2))
	expectTopics(t, l, sub, "bastion/gw1/a/t/n", "bastion/gw1/a/t/n")
	waitFor(t, "the refused message parked", 10*time.Second, parkedOne(l, p))
	if st := l.up.Status(); !strings.Contains(st.LastParked, "0x87") {
		t.Errorf("Status.LastParked = %q, want the 0x87 refusal", st.LastParked)
	}

	writeACL("topic write bastion/gw1/x/#\n")
	if err := syscall.Kill(b.Pid(), syscall.SIGHUP); err != nil {
		t.Fatalf("reload mosquitto's ACL: %v", err)
	}
	// Mosquitto reloads the ACL file asynchronously; retry until it takes.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if n, err := l.up.RetryParked(ctx); err != nil || n != 1 {
			t.Fatalf("RetryParked = %d, %v; want 1, nil", n, err)
		}
		select {
		case pub := <-sub.Got:
			if pub.Topic != "bastion/gw1/x/t/n" || userProp(pub, OriginProperty) != "gw1" {
				t.Fatalf("cloud got %s, want bastion/gw1/x/t/n", pub.Topic)
			}
			if d := p.Stats().Depth; d != 0 {
				t.Errorf("parking depth %d after the retry arrived, want 0", d)
			}
			return
		case <-time.After(500 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the retried message never arrived; status %+v", l.up.Status())
		}
		waitFor(t, "parked again", 5*time.Second, parkedOne(l, p))
	}
}

// TestParkBurst: a broker that refuses everything is a link problem. At
// most parkBurst messages are parked with no success in between; the rest
// stays queued and is retried. (Mosquitto 2.0.11 also drops the connection
// after a run of denied publishes, so this covers reconnects too.)
func TestParkBurst(t *testing.T) {
	acl := filepath.Join(t.TempDir(), "acl")
	if err := os.WriteFile(acl, []byte("user gw1\ntopic read bastion/gw1/+/c/#\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, l, p := parkedLink(t, "acl_file "+acl+"\n", false)
	const total = 3 * parkBurst
	ms := make([]bridges.Message, total)
	for i := range ms {
		ms[i] = telemetry("a", i)
	}
	acceptAll(t, l, ms...)
	waitFor(t, "refusals past the burst", 30*time.Second, func() bool {
		return metric(t, l, "bastion_upstream_publish_errors_total") >= parkBurst+3
	})
	if d := p.Stats().Depth; d != parkBurst {
		t.Errorf("parking depth %d, want %d (the burst)", d, parkBurst)
	}
	if d := l.q.Stats().Depth; d != total-parkBurst {
		t.Errorf("queue depth %d, want %d (only the burst parked)", d, total-parkBurst)
	}
}

// TestUnsendableKeepsWhatCameBefore: a queued message is above the broker's
// Maximum Packet Size and cannot be parked (no parking queue), so it stays
// queued, unsent, and the error says why. The messages queued before it, in
// the same batch, were already given packet identifiers by that run: they
// must still be sent. (When such a message ended the run, they were dropped
// with it and never left, and each retry took more of the connection's
// window until the link stalled; now the run goes on without that device's
// messages.)
func TestUnsendableKeepsWhatCameBefore(t *testing.T) {
	// The cloud subscriber's session survives the broker restart below:
	// the link may publish before the subscriber is back.
	b := mosquitto.Start(t, mosquitto.Options{Config: "max_packet_size 300\n", Persistent: true})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", true)
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	waitFor(t, "link connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	// Queued while the broker is away, so that one run reads all three.
	b.Stop(t)
	waitFor(t, "link down", 10*time.Second, func() bool { return !l.up.Status().Connected })
	big := telemetry("c", 1)
	big.Payload = []byte(`{"pad":"` + strings.Repeat("x", 400) + `"}`)
	acceptAll(t, l, telemetry("a", 1), telemetry("b", 1), big)
	b.Start(t)
	expectTopics(t, l, sub, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n")
	waitFor(t, "the two sent messages deleted, the unsendable one kept", 10*time.Second, func() bool { return l.q.Stats().Depth == 1 })
	// The error says why the message is stuck and what to do about it.
	if st := l.up.Status(); !strings.Contains(st.LastError, "Maximum Packet Size of 300") ||
		!strings.Contains(st.LastError, "cannot be parked: the link has no parking queue") ||
		!strings.Contains(st.LastError, "raise the broker's maximum packet size (Mosquitto: max_packet_size) to at least 4") {
		t.Errorf("Status.LastError = %q, want the broker's Maximum Packet Size, why it is not parked, and the size to allow", st.LastError)
	}
}

// TestBrokerMaximumQoS0: a broker whose CONNACK allows QoS 0 only
// (Mosquitto's max_qos 0) stops the whole queue: the link sends at QoS 1 so
// that nothing is deleted before the broker's PUBACK. The error says so and
// what to change on the broker.
func TestBrokerMaximumQoS0(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{Config: "max_qos 0\n"})
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	acceptAll(t, l, telemetry("a", 1))
	waitFor(t, "the QoS refusal reported", 10*time.Second, func() bool { return strings.Contains(l.up.Status().LastError, "grants at most QoS 0") })
	if st := l.up.Status(); !strings.Contains(st.LastError, "seq 1 from a and every message behind it stay queued until the broker allows QoS 1 for this gateway (Mosquitto: max_qos 1 or more)") {
		t.Errorf("Status.LastError = %q, want what stays queued and what to change on the broker", st.LastError)
	}
	if d := l.q.Stats().Depth; d != 1 {
		t.Errorf("queue depth %d, want 1 (kept)", d)
	}
}

// TestRefusedAgainAfterParked: the broker refuses for good two copies of
// one message (a later run on the same connection sent it again before the
// first copy's PUBACK). The first refusal parks it; the second finds it gone
// from the queue, which means it is handled: no wait on paho's reading
// goroutine (the lookup used to wait up to 10 s for a message after it, with
// PUBACKs and PINGRESPs unread meanwhile), no failed run, and the device's
// later messages are not held back.
func TestRefusedAgainAfterParked(t *testing.T) {
	q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	u := &Upstream{log: testLog(), q: q, m: newMetrics()}
	u.cur.Store(&snapshot{cfg: validConfig()})
	p := startParkingQueue(t, t.TempDir())
	u.SetParking(p)
	if err := q.Accept(context.Background(), telemetry("d1", 1)); err != nil {
		t.Fatal(err)
	}
	es, err := q.Held(0, 1)
	if err != nil || len(es) != 1 {
		t.Fatalf("Held: %v %v", es, err)
	}
	seq := es[0].Seq

	first := &sendRun{u: u, cancel: func() {}}
	first.puback(seq, "d1", 0x87)
	if p.Stats().Depth != 1 || q.Stats().Depth != 0 || first.failed.Load() {
		t.Fatalf("first refusal: parked %d, queued %d, run failed %v; want 1, 0, false", p.Stats().Depth, q.Stats().Depth, first.failed.Load())
	}

	second := &sendRun{u: u, cancel: func() {}}
	start := time.Now()
	second.puback(seq, "d1", 0x87)
	if d := time.Since(start); d > time.Second {
		t.Errorf("the second refusal took %v on the reading goroutine, want no wait", d)
	}
	if second.failed.Load() || second.holds("d1") {
		t.Errorf("second refusal of a parked message: run failed %v, d1 held %v; want neither (LastError %q)", second.failed.Load(), second.holds("d1"), u.Status().LastError)
	}
	if p.Stats().Depth != 1 {
		t.Errorf("parked %d, want 1 (parked once)", p.Stats().Depth)
	}
}

func startParkingQueue(t testing.TB, dir string) *queue.Queue {
	t.Helper()
	p, err := queue.Open(dir, queue.Options{MaxBytes: 1 << 20}, testLog(), nil)
	if err != nil {
		t.Fatalf("open the parking queue: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// failingAck is a main queue whose next Ack fails, as a closed queue's
// does at shutdown: when close is set the queue is closed first, so that
// the message stays in it for the next start.
type failingAck struct {
	*queue.Queue
	close bool
	armed atomic.Bool
}

func (q *failingAck) Ack(seqs ...uint64) error {
	if q.armed.Swap(false) {
		if !q.close {
			return queue.ErrClosed
		}
		q.Queue.Close()
	}
	return q.Queue.Ack(seqs...)
}

// TestParkedOnceWhenAckFails: a message the broker refused for good is
// written to the parking queue, and then the main queue's Ack fails (it is
// closed: the gateway is shutting down). The message is held twice. When
// it is refused again, in the same run of the link or after a restart, it
// used to be parked a second time, and a retry brought back two copies
// with different seqs. The park now finds it parked already and only
// deletes it from the main queue.
func TestParkedOnceWhenAckFails(t *testing.T) {
	for name, restart := range map[string]bool{"same run": false, "restart": true} {
		t.Run(name, func(t *testing.T) {
			mainDir, parkDir := t.TempDir(), t.TempDir()
			open := func(dir string) *queue.Queue {
				q, err := queue.Open(dir, queue.Options{MaxBytes: 1 << 20}, testLog(), nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { q.Close() })
				return q
			}
			link := func(q Source, p *queue.Queue) *Upstream {
				u := &Upstream{log: testLog(), q: q, m: newMetrics()}
				u.cur.Store(&snapshot{cfg: validConfig()})
				u.SetParking(p)
				return u
			}
			q, p := open(mainDir), open(parkDir)
			if err := q.Accept(context.Background(), telemetry("d1", 1)); err != nil {
				t.Fatal(err)
			}
			es, err := q.Held(0, 1)
			if err != nil || len(es) != 1 {
				t.Fatalf("Held: %v %v", es, err)
			}
			seq := es[0].Seq
			fq := &failingAck{Queue: q, close: restart}
			fq.armed.Store(true)
			u := link(fq, p)
			first := &sendRun{u: u, cancel: func() {}}
			first.puback(seq, "d1", 0x87)
			// Not parked whole: the message stays queued and its device
			// waits, the run goes on for the others (sendRun.puback).
			if !first.stalled.Load() || !first.holds("d1") || p.Stats().Depth != 1 {
				t.Fatalf("the Ack failed: run stalled %v, d1 held %v, parked %d; want true, true, 1", first.stalled.Load(), first.holds("d1"), p.Stats().Depth)
			}
			if restart {
				p.Close()
				q, p = open(mainDir), open(parkDir)
				u = link(q, p)
			}
			if d := q.Stats().Depth; d != 1 {
				t.Fatalf("queued %d after the failed Ack, want 1", d)
			}
			second := &sendRun{u: u, cancel: func() {}}
			second.puback(seq, "d1", 0x87)
			if second.failed.Load() {
				t.Errorf("the second refusal failed the run: %s", u.Status().LastError)
			}
			if pd, qd := p.Stats().Depth, q.Stats().Depth; pd != 1 || qd != 0 {
				t.Fatalf("after the second refusal: parked %d, queued %d; want 1, 0 (parked once)", pd, qd)
			}
			ps, err := u.ListParked(context.Background(), 10)
			if err != nil || len(ps.Messages) != 1 || ps.Messages[0].Why != "PUBACK reason 0x87 (The PUBLISH is not authorized.)" || ps.Messages[0].Topic != "devices/d1/t/n" {
				t.Errorf("ListParked = %+v, %v; want the message and the refusal alone", ps.Messages, err)
			}
			if n, err := u.RetryParked(context.Background()); n != 1 || err != nil {
				t.Errorf("RetryParked = %d, %v; want 1 message back", n, err)
			}
		})
	}
}

// TestSplitParked: what the parking queue holds after a parked message's
// topic, with the main queue's seq and without (parked before it was kept).
func TestSplitParked(t *testing.T) {
	for _, tc := range []struct {
		stored, topic, why string
		from               uint64
	}{
		{"devices/d1/t/n\x00PUBACK reason 0x87 (not authorized)\x0042", "devices/d1/t/n", "PUBACK reason 0x87 (not authorized)", 42},
		{"devices/d1/t/n\x00PUBACK reason 0x87 (not authorized)", "devices/d1/t/n", "PUBACK reason 0x87 (not authorized)", 0},
		{"devices/d1/t/n", "devices/d1/t/n", "", 0},
		{"devices/d1/t/n\x00PUBACK reason 0x87 (not authorized)\x0042\x00qos0", "devices/d1/t/n", "PUBACK reason 0x87 (not authorized)", 42},
	} {
		m, why, from := splitParked(bridges.Message{Topic: tc.stored})
		if m.Topic != tc.topic || why != tc.why || from != tc.from {
			t.Errorf("splitParked(%q) = %q, %q, %d; want %q, %q, %d", tc.stored, m.Topic, why, from, tc.topic, tc.why, tc.from)
		}
	}
}

// TestRetryParkedSkipsRefusedDevice: the main queue refuses one device's
// parked messages (it holds its share of the queue) and takes the other
// device's. The retry used to stop at the first refusal, leaving every
// device's parked messages behind it. The refused device keeps all its
// parked messages, in order (its later, smaller message fits but must not
// overtake the refused one); the other device's are moved; the error says
// which device keeps how many and why.
func TestRetryParkedSkipsRefusedDevice(t *testing.T) {
	ctx := context.Background()
	q, err := queue.Open(t.TempDir(), queue.Options{MaxBytes: 1 << 20, MaxMessageBytes: 512, MaxDeviceBytes: 1024}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	u := gateLink(t, validConfig(), q)
	p := startParkingQueue(t, t.TempDir())
	u.SetParking(p)

	// d1 fills its share with small messages, then one is delivered: room
	// for one small message, not for a large one.
	var filled []uint64
	for i := 0; ; i++ {
		if i == 100 {
			t.Fatal("d1's share never filled")
		}
		err := q.Accept(ctx, telemetry("d1", 0))
		if errors.Is(err, bridges.ErrQueueFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	es, err := q.Held(0, 100)
	if err != nil || len(es) < 2 {
		t.Fatalf("Held: %d entries, %v", len(es), err)
	}
	for _, e := range es {
		filled = append(filled, e.Seq)
	}
	if err := q.Ack(filled[0]); err != nil {
		t.Fatal(err)
	}

	large := telemetry("d1", 1)
	large.Payload = append(large.Payload, strings.Repeat(" ", 300)...)
	parked := []bridges.Message{large, telemetry("d2", 1), telemetry("d1", 2), telemetry("d2", 2)}
	for i, m := range parked {
		m.Topic += fmt.Sprintf("\x00PUBACK reason 0x87 (not authorized)\x00%d", 1000+i)
		if err := p.Accept(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	payloads := func(es []queue.Entry) []string {
		var out []string
		for _, e := range es {
			out = append(out, e.Device+" "+string(e.Payload))
		}
		return out
	}
	want := func(ms ...bridges.Message) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.Device+" "+string(m.Payload))
		}
		return out
	}

	n, err := u.RetryParked(ctx)
	if n != 2 {
		t.Errorf("RetryParked moved %d, want 2 (d2's)", n)
	}
	var kept *RetryKept
	if !errors.As(err, &kept) || !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("RetryParked error = %v; want a *RetryKept wrapping bridges.ErrQueueFull", err)
	}
	if len(kept.Devices) != 1 || kept.Devices[0].Device != "d1" || kept.Devices[0].Messages != 2 {
		t.Errorf("kept = %+v; want d1 keeping 2", kept.Devices)
	}
	if !strings.Contains(err.Error(), "2 parked messages of 1 devices stay parked") || !strings.Contains(err.Error(), "d1: 2 (") {
		t.Errorf("error %q does not say what stays parked", err)
	}
	left, err := p.Held(0, 10)
	if err != nil {
		t.Fatal(err)
	}
	gotLeft := payloads(left)
	if diff := cmp.Diff(want(large, telemetry("d1", 2)), gotLeft); diff != "" {
		t.Errorf("still parked (-want +got):\n%s", diff)
	}
	moved, err := q.Held(filled[len(filled)-1], 10)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want(telemetry("d2", 1), telemetry("d2", 2)), payloads(moved)); diff != "" {
		t.Errorf("moved to the main queue (-want +got):\n%s", diff)
	}

	// d1's messages delivered: its parked ones follow, in order.
	if err := q.Ack(filled[1:]...); err != nil {
		t.Fatal(err)
	}
	if n, err := u.RetryParked(ctx); n != 2 || err != nil {
		t.Fatalf("second RetryParked = %d, %v; want 2, nil", n, err)
	}
	moved, err = q.Held(filled[len(filled)-1], 10)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want(telemetry("d2", 1), telemetry("d2", 2), large, telemetry("d1", 2)), payloads(moved)); diff != "" {
		t.Errorf("main queue after the second retry (-want +got):\n%s", diff)
	}
}

package upstream

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// A command from the cloud for a device that neither observes nor
// subscribes is kept by the hub but counted result="no_receiver", not
// "delivered" (the hub used to answer nil either way and the link counted
// every such command as delivered); with an observer it is "delivered".
//
// Mutation that fails it: the errors.Is(err, bridges.ErrNoReceiver) branch
// in downlink removed (the error then counts as "refused"), or hub.Downlink
// returning nil when nobody received the command (counted "delivered").
func TestDownlinkNoReceiverCounted(t *testing.T) {
	h, err := hub.New(hub.LocalSink{}, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	u := &Upstream{log: slog.New(slog.DiscardHandler), m: newMetrics(), deliver: h.Downlink, lines: ratelog.New(time.Minute)}
	u.cur.Store(&snapshot{cfg: c, routes: rs})
	ctx := context.Background()
	count := func() (delivered, none, refused float64) {
		return testutil.ToFloat64(u.m.downlink.WithLabelValues("delivered")),
			testutil.ToFloat64(u.m.downlink.WithLabelValues("no_receiver")),
			testutil.ToFloat64(u.m.downlink.WithLabelValues("refused"))
	}

	u.downlink(ctx, &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("on")})
	if d, n, r := count(); d != 0 || n != 1 || r != 0 {
		t.Fatalf("no observer: delivered=%v no_receiver=%v refused=%v, want 0 1 0", d, n, r)
	}
	if st := u.Status(); st.Downlink != 0 {
		t.Errorf("Status().Downlink = %d with nobody listening, want 0", st.Downlink)
	}
	if m, ok := h.LastCommand("devices/dev1/c/led"); !ok || string(m.Payload) != "on" {
		t.Errorf("the command is not kept for the device's next GET: %q %v", m.Payload, ok)
	}

	var got []string
	cancel := h.Observe("dev1", "devices/dev1/c", func(m bridges.Message) { got = append(got, string(m.Payload)) })
	defer cancel()
	u.downlink(ctx, &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("off")})
	if d, n, r := count(); d != 1 || n != 1 || r != 0 {
		t.Fatalf("with an observer: delivered=%v no_receiver=%v refused=%v, want 1 1 0", d, n, r)
	}
	if st := u.Status(); st.Downlink != 1 || len(got) != 1 {
		t.Errorf("Status().Downlink = %d, observer got %q; want 1 and [off]", st.Downlink, got)
	}
}

// TestBrokerHonoursReceiveMaximum: while the link has not answered the
// commands it holds (its Deliver is stuck), Mosquitto sends it no more than
// the link's Receive Maximum of them; the rest wait at the broker. Without
// the announcement Mosquitto would send up to its max_inflight_messages
// (100 in these tests).
func TestBrokerHonoursReceiveMaximum(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{Config: "log_type debug\n"})
	q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	delivered := make(chan struct{}, 100)
	up, err := New(linkConfig(t, b, "gw1"), q, func(ctx context.Context, m bridges.Message) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		delivered <- struct{}{}
		return nil
	}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- up.Run(ctx) }()
	defer func() {
		cancel()
		<-done
		q.Close()
	}()
	waitFor(t, "link subscribed", 10*time.Second, func() bool { return strings.Contains(b.Log(), "Sending SUBACK to gw1") })

	const total = 3 * downlinkReceiveMaximum
	conn, err := tls.Dial("tcp", b.Addr, b.ClientTLS(b.CA.Client(t, "cloud")))
	if err != nil {
		t.Fatal(err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: packets.NewThreadSafeConn(conn), ClientID: "cloud"})
	pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer pcancel()
	if _, err := c.Connect(pctx, &paho.Connect{ClientID: "cloud", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	for i := range total {
		if _, err := c.Publish(pctx, &paho.Publish{Topic: fmt.Sprintf("bastion/gw1/dev1/c/n%d", i), QoS: 1, Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	// Mosquitto has all of them now (it answered each PUBLISH); it sends
	// the link what its inflight window allows at once.
	sent := func() int { return strings.Count(b.Log(), "Sending PUBLISH to gw1") }
	waitFor(t, "the first commands sent", 10*time.Second, func() bool { return sent() >= downlinkReceiveMaximum })
	time.Sleep(300 * time.Millisecond)
	if n := sent(); n != downlinkReceiveMaximum {
		t.Fatalf("Mosquitto sent %d commands while the link held them all unanswered, want %d (the link's Receive Maximum)", n, downlinkReceiveMaximum)
	}
	close(release)
	for range total {
		select {
		case <-delivered:
		case <-time.After(10 * time.Second):
			t.Fatalf("not every command delivered once the link answered; Mosquitto sent %d", sent())
		}
	}
}

// TestRetainedCommandNotReplayed: a command the cloud published retained
// is not delivered when the link subscribes, on its first connection or
// after a reconnect: the link subscribes anew on each (clean session), so a
// retained "reboot" would be carried out again every time. Commands sent
// while the link is subscribed arrive.
func TestRetainedCommandNotReplayed(t *testing.T) {
	// Persistent: the retained command is still there after the restart.
	b := mosquitto.Start(t, mosquitto.Options{Persistent: true})
	cloudPublish(t, b, "cloud", &paho.Publish{Topic: "bastion/gw1/dev1/c/reboot", QoS: 1, Retain: true, Payload: []byte("now")})
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	expect := func(topic string) {
		t.Helper()
		select {
		case m := <-l.commands:
			if m.Topic != topic {
				t.Fatalf("command %s %q delivered, want %s (a retained command replayed?)", m.Topic, m.Payload, topic)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s never arrived; status %+v", topic, l.up.Status())
		}
	}
	waitFor(t, "the downlink subscribed", 10*time.Second, func() bool { return l.up.Status().DownlinkSubscribed })
	cloudPublish(t, b, "cloud", &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("on")})
	expect("devices/dev1/c/led")

	b.Stop(t)
	waitFor(t, "link down", 10*time.Second, func() bool { return !l.up.Status().Connected })
	b.Start(t)
	waitFor(t, "the downlink subscribed again", 10*time.Second, func() bool { return l.up.Status().DownlinkSubscribed })
	cloudPublish(t, b, "cloud", &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("off")})
	expect("devices/dev1/c/led")
}

// TestRetainedCommandDropped: a broker that ignores Retain Handling 2 and
// replays a retained command anyway (it arrives with the retain flag) does
// not get it delivered to the device.
func TestRetainedCommandDropped(t *testing.T) {
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	var got []bridges.Message
	u := &Upstream{log: slog.New(slog.DiscardHandler), m: newMetrics(), lines: ratelog.New(time.Minute), deliver: func(_ context.Context, m bridges.Message) error {
		got = append(got, m)
		return nil
	}}
	u.cur.Store(&snapshot{cfg: c, routes: rs})
	u.downlink(context.Background(), &paho.Publish{Topic: "bastion/gw1/dev1/c/reboot", QoS: 1, Retain: true, Payload: []byte("now")})
	u.downlink(context.Background(), &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("on")})
	if len(got) != 1 || got[0].Topic != "devices/dev1/c/led" {
		t.Fatalf("delivered %+v, want only devices/dev1/c/led", got)
	}
	if n := testutil.ToFloat64(u.m.downlink.WithLabelValues("retained")); n != 1 {
		t.Errorf(`bastion_upstream_downlink_total{result="retained"} = %v, want 1`, n)
	}
}

// Downlink commands the link drops, keeps for nobody or sees refused cannot
// flood the log: the broker sends 200 of each (retained replays, commands
// no session receives, commands Deliver refuses as too large, commands it
// refuses otherwise) for ids and topics of 10 KiB. Each is counted; each
// result gets a line or two (one a minute, saying how many were not
// logged), with the id, topic and error cut. Before, each command wrote a
// line with the whole topic, up to 256 KiB.
//
// Mutation that fails it: any of the three lines in downlink back on
// u.log directly (200 lines), or without ratelog.Clip (10 KiB topics).
func TestDownlinkLinesDoNotFloodTheLog(t *testing.T) {
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 10<<10)
	rec := &recordLines{}
	u := &Upstream{log: slog.New(rec), m: newMetrics(), lines: ratelog.New(time.Minute), deliver: func(_ context.Context, m bridges.Message) error {
		switch {
		case strings.HasPrefix(m.Device, "none"):
			return bridges.ErrNoReceiver
		case strings.HasPrefix(m.Device, "big"):
			return fmt.Errorf("command for device %q: %d bytes: %w", m.Device, len(m.Payload), ErrCommandTooLarge)
		}
		return fmt.Errorf("command for device %q: no such device", m.Device)
	}}
	u.cur.Store(&snapshot{cfg: c, routes: rs})
	const n = 200
	for i := range n {
		for _, p := range []*paho.Publish{
			{Topic: fmt.Sprintf("bastion/gw1/dev%d%s/c/%s", i, long, long), Retain: true},
			{Topic: fmt.Sprintf("bastion/gw1/none%d%s/c/%s", i, long, long)},
			{Topic: fmt.Sprintf("bastion/gw1/big%d%s/c/%s", i, long, long)},
			{Topic: fmt.Sprintf("bastion/gw1/gone%d%s/c/%s", i, long, long)},
		} {
			p.QoS, p.Payload = 1, []byte("x")
			u.downlink(context.Background(), p)
		}
	}
	for _, result := range []string{"retained", "no_receiver", "too_large", "refused"} {
		if got := testutil.ToFloat64(u.m.downlink.WithLabelValues(result)); got != n {
			t.Errorf(`bastion_upstream_downlink_total{result=%q} = %v, want %d: every command is counted`, result, got, n)
		}
		lines := rec.with("result", result)
		if len(lines) < 1 || len(lines) > 2 {
			t.Errorf("%d log lines for %d commands with result %s, want 1 or 2 (one a minute)", len(lines), n, result)
		}
		for _, a := range lines {
			for _, k := range []string{"device", "topic", "err"} {
				if len(a[k]) > ratelog.MaxText+32 {
					t.Errorf("result %s: a log line with a %d-byte %s, want it cut", result, len(a[k]), k)
				}
			}
		}
	}
}

// recordLines is a slog.Handler that keeps each line's attributes.
type recordLines struct {
	mu    sync.Mutex
	attrs []map[string]string
}

func (r *recordLines) Enabled(context.Context, slog.Level) bool { return true }
func (r *recordLines) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recordLines) WithGroup(string) slog.Handler            { return r }
func (r *recordLines) Handle(_ context.Context, rec slog.Record) error {
	a := map[string]string{"msg": rec.Message}
	rec.Attrs(func(at slog.Attr) bool { a[at.Key] = at.Value.String(); return true })
	r.mu.Lock()
	r.attrs = append(r.attrs, a)
	r.mu.Unlock()
	return nil
}

// with is the lines whose attribute k is v.
func (r *recordLines) with(k, v string) []map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]string
	for _, a := range r.attrs {
		if a[k] == v {
			out = append(out, a)
		}
	}
	return out
}

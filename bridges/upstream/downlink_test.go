package upstream

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
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
	u := &Upstream{log: slog.New(slog.DiscardHandler), m: newMetrics(), deliver: h.Downlink}
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
	u := &Upstream{log: slog.New(slog.DiscardHandler), m: newMetrics(), deliver: func(_ context.Context, m bridges.Message) error {
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

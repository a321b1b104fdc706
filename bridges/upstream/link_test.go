package upstream

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/rawconn"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
	"github.com/google/go-cmp/cmp"
)

// TestEndToEnd: Accept -> queue -> upstream -> Mosquitto -> subscriber on
// the mapped topics, with privacy rules, and a downlink command back.
func TestEndToEnd(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	cfg := linkConfig(t, b, "gw1")
	cfg.Forward = []Rule{
		{Topic: "devices/+/t/secret/#", Action: ActionLocal},
		{Topic: "devices/+/t/gps", Action: ActionRedact, Fields: []string{"lat", "lon"}},
		{Topic: "devices/+/t/#", Action: ActionForward},
	}
	l := startLink(t, cfg, t.TempDir())
	waitFor(t, "link connected", 10*time.Second, func() bool { return l.up.Status().Connected })

	ctx := context.Background()
	type rx struct{ Topic, Payload, Origin string }
	var want []rx
	for i := range 30 {
		dev := fmt.Sprintf("dev%d", i%3)
		m := telemetry(dev, i)
		if err := l.up.Accept(ctx, m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
		want = append(want, rx{"bastion/gw1/" + dev + "/t/n", string(m.Payload), "gw1"})
	}
	mustAccept := func(m bridges.Message) {
		t.Helper()
		if err := l.up.Accept(ctx, m); err != nil {
			t.Fatalf("Accept %s: %v", m.Topic, err)
		}
	}
	mustAccept(bridges.Message{Device: "dev0", Topic: "devices/dev0/t/secret/key", QoS: 1, Payload: []byte(`{"k":1}`)})
	mustAccept(bridges.Message{Device: "dev0", Topic: "devices/dev0/state", QoS: 1, Payload: []byte(`{}`)})
	mustAccept(bridges.Message{Device: "dev0", Topic: "devices/dev0/t/gps", QoS: 1, Payload: []byte(`{"lat":48.1,"lon":11.5,"fix":3}`)})
	want = append(want, rx{"bastion/gw1/dev0/t/gps", `{"fix":3}`, "gw1"})
	if err := l.up.Accept(ctx, bridges.Message{Device: "dev0", Topic: "devices/dev1/t/n", QoS: 1}); err == nil {
		t.Fatalf("Accept of another device's topic succeeded")
	}

	var got []rx
	seqs := map[string]bool{}
	for len(got) < len(want) {
		select {
		case p := <-sub.Got:
			got = append(got, rx{p.Topic, string(p.Payload), userProp(p, OriginProperty)})
			seqs[userProp(p, SeqProperty)] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("received %d of %d messages; status %+v", len(got), len(want), l.up.Status())
		}
	}
	// Order is kept per device; across devices it may interleave.
	byDev := func(rs []rx) map[string][]rx {
		m := map[string][]rx{}
		for _, r := range rs {
			m[strings.Split(r.Topic, "/")[2]] = append(m[strings.Split(r.Topic, "/")[2]], r)
		}
		return m
	}
	if d := cmp.Diff(byDev(want), byDev(got)); d != "" {
		t.Fatalf("upstream messages per device (-want +got):\n%s", d)
	}
	if len(seqs) != len(want) {
		t.Errorf("distinct %s values = %d, want %d", SeqProperty, len(seqs), len(want))
	}
	waitFor(t, "queue drained", 5*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	st := l.up.Status()
	if st.Published != uint64(len(want)) || st.Withheld != 2 {
		t.Errorf("status published=%d withheld=%d, want %d and 2", st.Published, st.Withheld, len(want))
	}

	// Downlink: a command from the cloud reaches the callback for dev1.
	cloudPublish(t, b, "cloud-app", &paho.Publish{Topic: "bastion/gw1/dev1/c/led/set", QoS: 1, Payload: []byte("on")})
	select {
	case m := <-l.commands:
		want := bridges.Message{Device: "dev1", Topic: "devices/dev1/c/led/set", QoS: 1, Payload: []byte("on")}
		m.Received = time.Time{}
		if d := cmp.Diff(want, m); d != "" {
			t.Fatalf("downlink command (-want +got):\n%s", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("downlink command not delivered; status %+v", l.up.Status())
	}
	// A command carrying our own origin marker is dropped as a loop.
	cloudPublish(t, b, "cloud-app", &paho.Publish{Topic: "bastion/gw1/dev1/c/x", QoS: 1, Payload: []byte("loop"),
		Properties: &paho.PublishProperties{User: paho.UserProperties{{Key: OriginProperty, Value: "gw1"}}}})
	// Another gateway's command namespace is not ours.
	cloudPublish(t, b, "cloud-app", &paho.Publish{Topic: "bastion/gw2/dev1/c/x", QoS: 1, Payload: []byte("not ours")})
	cloudPublish(t, b, "cloud-app", &paho.Publish{Topic: "bastion/gw1/dev2/c/after", QoS: 1, Payload: []byte("after")})
	select {
	case m := <-l.commands:
		if m.Topic != "devices/dev2/c/after" {
			t.Fatalf("delivered %s, want only devices/dev2/c/after (loop and foreign commands dropped)", m.Topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("second command not delivered")
	}
	if n := l.up.Status().LoopsDropped; n != 1 {
		t.Fatalf("loops dropped = %d, want 1", n)
	}
	// Our own telemetry never comes back as a command (no-local + disjoint
	// mappings): nothing else arrived on the callback.
	select {
	case m := <-l.commands:
		t.Fatalf("unexpected delivery %+v", m)
	default:
	}
}

// TestRefusesUntrustedBroker: a wrong CA bundle or server name is refused
// with a clear error, nothing is sent, and the queue keeps the messages.
func TestRefusesUntrustedBroker(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "#", false)
	other := testpki.New(t, t.TempDir(), "other")
	cases := map[string]struct {
		edit func(*Config)
		want string
	}{
		"wrong CA":          {func(c *Config) { c.CAFile = other.CertFile }, "not signed by a CA in upstream.ca_file"},
		"wrong server name": {func(c *Config) { c.ServerName = "evil.example" }, `not valid for upstream.server_name "evil.example"`},
		"client certificate from another CA": {func(c *Config) {
			leaf := other.Client(t, "gw1")
			c.CertFile, c.KeyFile = leaf.CertFile, leaf.KeyFile
		}, "broker refused the TLS handshake, likely our client certificate (upstream.cert_file"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := linkConfig(t, b, "gw1")
			tc.edit(&cfg)
			l := startLink(t, cfg, t.TempDir())
			for i := range 20 {
				if err := l.up.Accept(context.Background(), telemetry("d1", i)); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "a TLS error in status", 10*time.Second, func() bool {
				return strings.Contains(l.up.Status().LastError, tc.want)
			})
			// Several attempts, all refused.
			waitFor(t, "retries", 10*time.Second, func() bool { return metric(t, l, "bastion_upstream_connect_errors_total") >= 3 })
			st := l.up.Status()
			if st.Connected || st.Published != 0 {
				t.Fatalf("status %+v: want not connected, nothing published", st)
			}
			if d := l.q.Stats().Depth; d != 20 {
				t.Fatalf("queue depth %d, want 20 kept", d)
			}
			select {
			case p := <-sub.Got:
				t.Fatalf("broker received %s despite an untrusted server", p.Topic)
			default:
			}
			t.Logf("status error: %s", st.LastError)
		})
	}
}

// TestConnectedGauge: bastion_upstream_connected is 1 while the link is up,
// 0 once the broker has gone away, and 1 again when it is back.
func TestConnectedGauge(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	gauge := func() float64 { return metric(t, l, "bastion_upstream_connected") }
	waitFor(t, "bastion_upstream_connected 1", 10*time.Second, func() bool { return gauge() == 1 })
	b.Stop(t)
	waitFor(t, "bastion_upstream_connected 0 after the broker stopped", 10*time.Second, func() bool { return gauge() == 0 })
	if l.up.Status().Connected {
		t.Errorf("status says connected with the broker stopped")
	}
	b.Start(t)
	waitFor(t, "bastion_upstream_connected 1 after the broker is back", 10*time.Second, func() bool { return gauge() == 1 })
}

// TestTLS12ByConfig: TLS 1.3 by default, 1.2 only by config. Against a
// Mosquitto that speaks only TLS 1.2 the default config is refused with an
// error that names upstream.tls_min_version and the value to set, the
// broker never sees the gateway and the queue keeps the message; with
// tls_min_version "1.2" the same queue connects and delivers it.
func TestTLS12ByConfig(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{TLSVersion: "1.2"})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	dir := t.TempDir()
	cfg := linkConfig(t, b, "gw1")
	l := startLink(t, cfg, dir)
	m := telemetry("d1", 1)
	if err := l.up.Accept(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	const want = `the broker does not speak TLS 1.3, which upstream.tls_min_version "1.3" requires; if it can only do TLS 1.2, set upstream.tls_min_version = "1.2"`
	waitFor(t, "the TLS version error in status", 10*time.Second, func() bool {
		return strings.Contains(l.up.Status().LastError, want)
	})
	waitFor(t, "retries", 10*time.Second, func() bool { return metric(t, l, "bastion_upstream_connect_errors_total") >= 3 })
	if st := l.up.Status(); st.Connected || st.Published != 0 {
		t.Fatalf("status %+v: want not connected, nothing published", st)
	}
	if d := l.q.Stats().Depth; d != 1 {
		t.Fatalf("queue depth %d, want the message kept", d)
	}
	if strings.Contains(b.Log(), "u'gw1'") {
		t.Fatalf("the broker saw the gateway connect over TLS 1.2 with the default config:\n%s", b.Log())
	}
	select {
	case p := <-sub.Got:
		t.Fatalf("the cloud got %s with the default config", p.Topic)
	default:
	}
	t.Logf("status error: %s", l.up.Status().LastError)
	l.stop()

	cfg.TLSMinVersion = "1.2"
	l = startLink(t, cfg, dir)
	select {
	case p := <-sub.Got:
		if p.Topic != "bastion/gw1/d1/t/n" || string(p.Payload) != string(m.Payload) {
			t.Fatalf("cloud got %s %q, want bastion/gw1/d1/t/n %q", p.Topic, p.Payload, m.Payload)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("nothing delivered with tls_min_version 1.2; status %+v", l.up.Status())
	}
	waitFor(t, "queue drained", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
}

func metric(t testing.TB, l *link, name string) float64 {
	mfs, err := l.reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	var v float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				if m.Counter != nil {
					v += m.Counter.GetValue()
				}
				if m.Gauge != nil {
					v += m.Gauge.GetValue()
				}
			}
		}
	}
	return v
}

// TestRotation: a new client certificate (and a reloaded CA bundle) are
// swapped in while connected; the link reconnects with the new certificate.
func TestRotation(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	cfg := linkConfig(t, b, "gw1-v1")
	l := startLink(t, cfg, t.TempDir())
	waitFor(t, "connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	send := func(i int) {
		t.Helper()
		if err := l.up.Accept(context.Background(), telemetry("d1", i)); err != nil {
			t.Fatal(err)
		}
		for {
			select {
			case p := <-sub.Got:
				var v struct{ I int }
				json.Unmarshal(p.Payload, &v)
				if v.I < i {
					continue // a resend of an earlier message (at least once)
				}
				if v.I != i {
					t.Fatalf("got message %d, want %d", v.I, i)
				}
				return
			case <-time.After(10 * time.Second):
				t.Fatalf("message %d not received; status %+v", i, l.up.Status())
			}
		}
	}
	send(1)
	// Its PUBACK may still be on the way; wait so the reconnect below does
	// not resend it (a resend would be allowed, but makes the test vaguer).
	waitFor(t, "message 1 acknowledged", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if !strings.Contains(b.Log(), "u'gw1-v1'") {
		t.Fatalf("broker log does not show the gw1-v1 certificate:\n%s", b.Log())
	}

	// A bad reload is refused and changes nothing.
	bad := cfg
	bad.CertFile = "/nonexistent.pem"
	if err := l.up.Reload(bad); err == nil || !strings.Contains(err.Error(), "upstream.cert_file") {
		t.Fatalf("Reload with a missing cert: %v, want an error naming upstream.cert_file", err)
	}
	loop := cfg
	loop.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/#", Local: "devices/{id}/c/#"}}
	if err := l.up.Reload(loop); err == nil || !strings.Contains(err.Error(), "loop") {
		t.Fatalf("Reload with a looping mapping: %v, want refusal", err)
	}
	if s := l.up.Status().ClientCertSubject; !strings.Contains(s, "gw1-v1") {
		t.Fatalf("subject after refused reloads = %q", s)
	}

	next := b.CA.Client(t, "gw1-v2")
	cfg2 := cfg
	cfg2.CertFile, cfg2.KeyFile = next.CertFile, next.KeyFile
	if err := l.up.Reload(cfg2); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	waitFor(t, "connection with the new certificate", 10*time.Second, func() bool {
		return strings.Contains(b.Log(), "u'gw1-v2'") && l.up.Status().Connected
	})
	send(2)
	if s := l.up.Status().ClientCertSubject; !strings.Contains(s, "gw1-v2") {
		t.Fatalf("status subject = %q, want gw1-v2", s)
	}
}

var _ = errors.New

// TestDialRunsOnRawConn: the link's TLS 1.3 connection to a real broker
// runs on rawconn (reads and writes without the runtime's syscall entry),
// and what dial returns is the PUBACK-filtering packetConn over it.
func TestDialRunsOnRawConn(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	cfg := linkConfig(t, b, "gw1")
	q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	up, err := New(cfg, q, nil, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	broker, err := url.Parse(cfg.Broker)
	if err != nil {
		t.Fatal(err)
	}
	c, err := up.dial(context.Background(), autopaho.ClientConfig{}, broker)
	if err != nil {
		t.Fatalf("dial %s: %v", cfg.Broker, err)
	}
	defer c.Close()
	pc, ok := c.(*packetConn)
	if !ok {
		t.Fatalf("dial returned %T; want *packetConn", c)
	}
	tc, ok := pc.Conn.(*tls.Conn)
	if !ok {
		t.Fatalf("packetConn runs on %T; want *tls.Conn", pc.Conn)
	}
	if v := tc.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Errorf("TLS version %x; want TLS 1.3", v)
	}
	if runtime.GOOS == "linux" && !rawconn.Is(tc.NetConn()) {
		t.Errorf("the link's TLS runs on %T; want a rawconn", tc.NetConn())
	}
}

// TestReloadWithholdsQueuedMessages: a privacy rule tightened by Reload
// also covers messages already queued (and acknowledged to their device):
// they are deleted unsent, and counted apart from the messages withheld at
// acceptance, so an operator sees what a reload cost. A message the new
// rules still forward is delivered.
func TestReloadWithholdsQueuedMessages(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	cfg := linkConfig(t, b, "gw1")
	b.Stop(t)
	l := startLink(t, cfg, t.TempDir())
	ctx := context.Background()
	for i := range 3 {
		if err := l.up.Accept(ctx, telemetry("dev0", i)); err != nil {
			t.Fatal(err)
		}
	}
	kept := bridges.Message{Device: "dev0", Topic: "devices/dev0/t/ok", QoS: 1, Payload: []byte(`{}`)}
	if err := l.up.Accept(ctx, kept); err != nil {
		t.Fatal(err)
	}
	if got := metric(t, l, "bastion_upstream_withheld_total"); got != 0 {
		t.Fatalf("withheld at acceptance: %v, want 0", got)
	}
	tight := cfg
	tight.Forward = []Rule{{Topic: "devices/+/t/n", Action: ActionLocal}, {Topic: "devices/+/t/#", Action: ActionForward}}
	if err := l.up.Reload(tight); err != nil {
		t.Fatal(err)
	}
	b.Start(t)
	waitFor(t, "the broker's PUBACK for the message the new rules forward", 10*time.Second, func() bool { return l.up.Status().Published == 1 })
	if got := metric(t, l, "bastion_upstream_withheld_queued_total"); got != 3 {
		t.Errorf("bastion_upstream_withheld_queued_total = %v, want the 3 queued messages the reload kept local", got)
	}
	if got := metric(t, l, "bastion_upstream_withheld_total"); got != 3 {
		t.Errorf("bastion_upstream_withheld_total = %v, want 3", got)
	}
	waitFor(t, "the queue to be empty", 10*time.Second, func() bool { return metric(t, l, "bastion_queue_depth") == 0 })
	if got := l.up.Status().Published; got != 1 {
		t.Errorf("published %d messages, want only the one the new rules forward", got)
	}
}

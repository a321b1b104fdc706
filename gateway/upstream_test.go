package gateway

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// startWithCloud starts a real Mosquitto as the cloud (TLS 1.3,
// require_certificate) and a dev gateway whose upstream link points at it,
// forwarding device telemetry.
func startWithCloud(t *testing.T) (*running, *mosquitto.Broker, *testpki.CA, string) {
	return startWithBroker(t, "")
}

// startWithBroker is startWithCloud with brokerConf appended to
// mosquitto.conf.
func startWithBroker(t *testing.T, brokerConf string) (*running, *mosquitto.Broker, *testpki.CA, string) {
	t.Helper()
	testenv.RequireCommand(t, "mosquitto")
	cloud := testpki.New(t, t.TempDir(), "cloud")
	b := mosquitto.Start(t, mosquitto.Options{CA: cloud, Config: brokerConf})
	gw := cloud.Client(t, "bastion-dev")
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	cfg := testConfig(dir)
	cfg.Upstream.Enabled = true
	cfg.Upstream.Config = upstream.Config{
		Broker: "mqtts://" + b.Addr, ServerName: "127.0.0.1", CAFile: cloud.CertFile,
		CertFile: gw.CertFile, KeyFile: gw.KeyFile, Gateway: "bastion-dev",
		Forward: []upstream.Rule{{Topic: "devices/+/t/#", Action: "forward"}},
	}
	cfg.Upstream.Config.Defaults()
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	return start(t, dir, nil), b, cloud, dir
}

// The gateway's upstream link reaches a real Mosquitto (TLS 1.3,
// require_certificate) and reports it; a reload with a bad upstream key is
// refused and the link stays up.
func TestUpstreamConnects(t *testing.T) {
	r, b, _, dir := startWithCloud(t)
	defer r.stop(t)
	connected := func() bool {
		st := r.g.Status().Components["upstream"].(map[string]any)["link"].(upstream.Status)
		return st.Connected
	}
	// A bound, not a wait: under the full race-enabled suite on two cores
	// the first TLS 1.3 handshake can take seconds.
	deadline := time.Now().Add(30 * time.Second)
	for !connected() {
		if time.Now().After(deadline) {
			t.Fatalf("upstream not connected within 30s; status %+v\nbroker log:\n%s", r.g.Status().Components["upstream"], b.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	path := filepath.Join(dir, "bastion.yaml")
	good, _ := os.ReadFile(path)
	os.WriteFile(path, []byte(strings.Replace(string(good), "broker: \"mqtts://", "broker: \"mqtt://", 1)), 0o600)
	if err := r.g.Reload(); err == nil || !strings.Contains(err.Error(), "upstream.broker") {
		t.Fatalf("reload with a cleartext broker: %v", err)
	}
	if !connected() {
		t.Error("refused reload dropped the upstream link")
	}
}

// A message the cloud broker refuses for good (here: above its
// message_size_limit) is parked on the box, not resent forever in front of
// everything else; bastionctl's API lists it and drops it, and the audit
// log records who did.
func TestUpstreamParkedControl(t *testing.T) {
	r, b, _, dir := startWithBroker(t, "message_size_limit 200\n")
	defer r.stop(t)
	upst := func() map[string]any { return r.g.Status().Components["upstream"].(map[string]any) }
	for deadline := time.Now().Add(30 * time.Second); !upst()["link"].(upstream.Status).Connected; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) { // slow first TLS handshakes under the race-enabled suite
			t.Fatalf("upstream not connected within 30s; status %+v", upst())
		}
	}
	ctx := context.Background()
	big := bridges.Message{Device: "d1", Topic: "devices/d1/t/big", QoS: 1, Payload: []byte(`{"pad":"` + strings.Repeat("x", 400) + `"}`)}
	small := bridges.Message{Device: "d1", Topic: "devices/d1/t/small", QoS: 1, Payload: []byte(`{"v":1}`)}
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	for _, m := range []bridges.Message{big, small} {
		if err := r.g.sink.Accept(ctx, m); err != nil {
			t.Fatalf("Accept %s: %v", m.Topic, err)
		}
	}
	select {
	case p := <-sub.Got:
		if !strings.HasSuffix(p.Topic, "/d1/t/small") {
			t.Fatalf("cloud got %s, want the small message", p.Topic)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the message behind the refused one never arrived; status %+v", upst())
	}
	ctl := control.New(control.SocketPath(dir))
	var p upstream.Parked
	waitFor(t, "one message parked", func() bool {
		_, err := ctl.Do(ctx, "GET", "/v1/upstream/parked", nil, &p)
		return err == nil && p.Depth == 1
	})
	if len(p.Messages) != 1 || p.Messages[0].Topic != big.Topic || !strings.Contains(p.Messages[0].Why, "0x95") {
		t.Fatalf("parked = %+v, want %s refused with 0x95", p, big.Topic)
	}
	// The console's upstream page shows the alarm and the parked message.
	rep, err := consoleUpstream{r.g}.Show(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(rep.Sections[0].Alarm, "1 messages refused by the broker") {
		t.Errorf("console alarm %q, want the parked message", rep.Sections[0].Alarm)
	}
	if len(rep.Sections) < 2 || !strings.HasPrefix(rep.Sections[1].Title, "Parked messages (1;") || len(rep.Sections[1].Table) != 1 || rep.Sections[1].Table[0][1] != big.Topic {
		t.Errorf("console sections %+v, want the parked message listed second", rep.Sections)
	}
	if _, err := ctl.Do(ctx, "GET", "/v1/upstream/parked?max=x", nil, nil); err == nil || !strings.Contains(err.Error(), "max=") {
		t.Errorf("a bad max: %v, want an error naming it", err)
	}
	var res struct{ Count int }
	if _, err := ctl.Do(ctx, "POST", "/v1/upstream/parked/drop", nil, &res); err != nil || res.Count != 1 {
		t.Fatalf("drop: %d, %v; want 1", res.Count, err)
	}
	if d := upst()["parked"].(map[string]any)["depth"]; d != 0 {
		t.Errorf("parked depth %v after drop, want 0", d)
	}
	audit, err := r.g.store.AuditLog(10, 0)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, a := range audit {
		found = found || a.Action == "upstream.parked.drop" && strings.Contains(a.Detail, "count=1")
	}
	if !found {
		t.Errorf("no audit entry for the drop: %+v", audit)
	}
}

// The console's device page gets the hub's per-device counters.
func TestConsoleTrafficCounters(t *testing.T) {
	r := start(t, filepath.Join(t.TempDir(), "state"), nil)
	defer r.stop(t)
	ctx := context.Background()
	if _, ok := (consoleTraffic{r.g}).Counters(ctx, "d1"); ok {
		t.Fatal("counters for a device never seen")
	}
	if err := r.g.hub.Telemetry(ctx, "coap", bridges.Message{Device: "d1", Topic: "devices/d1/t/temp", Payload: []byte("21.5")}); err != nil {
		t.Fatal(err)
	}
	c, ok := (consoleTraffic{r.g}).Counters(ctx, "d1")
	if !ok || c.MessagesIn != 1 || c.BytesIn != 4 || c.LastSeen.IsZero() {
		t.Errorf("counters = %+v, %v", c, ok)
	}
}

// TestConsoleRuleWhileCredentialsUnreadable: a rule set in the console
// takes effect at once even when the upstream certificate files cannot be
// read at that moment (here the key is gone, as midway through a rotation).
// The console used to apply its rules through a full reload of the link,
// which re-read those files, was refused, and kept forwarding the topic the
// operator had just made local while the console answered success.
func TestConsoleRuleWhileCredentialsUnreadable(t *testing.T) {
	r, _, _, _ := startWithCloud(t)
	defer r.stop(t)
	if err := os.Remove(r.g.cfg.Load().Upstream.KeyFile); err != nil {
		t.Fatal(err)
	}
	api := newConsoleAPI(t, r.g)
	req, _ := http.NewRequest("POST", api.base+"/api/v1/upstream/rules", strings.NewReader(`{"topic":"devices/+/t/location","action":"local"}`))
	req.Header.Set("Authorization", "Bearer "+api.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := api.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("console rule: %d %s, want 200", resp.StatusCode, body)
	}
	link := func() upstream.Status {
		return r.g.Status().Components["upstream"].(map[string]any)["link"].(upstream.Status)
	}
	before, depth := link().Withheld, r.g.queue.Stats().Depth
	m := bridges.Message{Device: "d1", Topic: "devices/d1/t/location", QoS: 1, Payload: []byte(`{"lat":51.5}`)}
	if err := r.g.sink.Accept(context.Background(), m); err != nil {
		t.Fatalf("Accept: %v", err)
	}
	if got := link().Withheld; got != before+1 {
		t.Errorf("withheld %d -> %d, want the message kept local by the console's rule", before, got)
	}
	if d := r.g.queue.Stats().Depth; d != depth {
		t.Errorf("queue depth %d -> %d: the message was queued for the cloud", depth, d)
	}
}

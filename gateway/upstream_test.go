package gateway

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// startWithCloud starts a real Mosquitto as the cloud (TLS 1.3,
// require_certificate) and a dev gateway whose upstream link points at it,
// forwarding device telemetry.
func startWithCloud(t *testing.T) (*running, *mosquitto.Broker, *testpki.CA, string) {
	t.Helper()
	testenv.RequireCommand(t, "mosquitto")
	cloud := testpki.New(t, t.TempDir(), "cloud")
	b := mosquitto.Start(t, mosquitto.Options{CA: cloud})
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

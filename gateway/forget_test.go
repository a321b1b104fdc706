package gateway

import (
	"bytes"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
)

// TestEraseForgetsTrafficWithoutCoAP: on a gateway with MQTT and no CoAP,
// the console's erase of a device's data drops what the hub keeps for it:
// its last-seen time and counters, and the commands kept for it. Only
// CoAP's revocation handler used to tell the hub, so with coap.enabled
// false the erased device's page kept showing them until the restart.
func TestEraseForgetsTrafficWithoutCoAP(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	cfg := testConfig(dir)
	cfg.CoAP.Enabled = false
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	lb := &logbuf.Buffer{}
	r := runGateway(t, Options{Dev: true, StateDir: dir, Log: slog.New(slog.NewTextHandler(lb, nil)),
		Out: &bytes.Buffer{}, Sink: &testSink{}}, 10*time.Second)
	g := &tgw{running: r, log: lb, dir: dir}
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("gateway log:\n%s", lb.String())
		}
	})
	if r.g.coap != nil || r.g.mqtt == nil {
		t.Fatal("want a gateway with MQTT and without CoAP")
	}
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "sensor", "cert")
	m, err := d.DialMQTT(ctx, r.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if rc, err := m.Publish(ctx, m.TelemetryTopic("temp"), 1, []byte("21.5")); rc != 0 || err != nil {
		t.Fatalf("publish: %#x %v", rc, err)
	}
	cmd := bridges.Message{Device: d.ID, Topic: "devices/" + d.ID + "/c/led", Payload: []byte("on"), QoS: 1}
	if err := r.g.Deliver(ctx, cmd); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.g.Hub().Traffic(d.ID); !ok {
		t.Fatal("before the erase the hub has no traffic row for the device that published")
	}
	if _, ok := r.g.Hub().LastCommand(cmd.Topic); !ok {
		t.Fatal("before the erase the hub keeps no command for the device")
	}
	api := newConsoleAPI(t, r.g)
	if code := api.do(t, "DELETE", "/api/v1/devices/"+d.ID+"/data", nil); code != http.StatusNoContent {
		t.Fatalf("erase: %d", code)
	}
	if tr, ok := r.g.Hub().Traffic(d.ID); ok {
		t.Errorf("after the erase the hub still has the device's traffic: %+v", tr)
	}
	if c, ok := r.g.Hub().LastCommand(cmd.Topic); ok {
		t.Errorf("after the erase the hub still keeps the command on %s: %q", c.Topic, c.Payload)
	}
}

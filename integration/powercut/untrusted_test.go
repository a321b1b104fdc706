package powercut

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// TestUntrustedBroker: a bastiond whose upstream.ca_file does not hold the
// broker's CA, and then (after SIGHUP) whose upstream.server_name is not in
// the broker's certificate, refuses to connect with an error in its log
// that names the key to fix; nothing reaches the cloud; the devices are
// still acknowledged and the queue (as `bastionctl --json status` reports
// it) keeps every message. With the right name, everything arrives.
func TestUntrustedBroker(t *testing.T) {
	testenv.RequireCommand(t, "mosquitto")
	const gatewayID, n = "gw-untrusted", 20
	cloudCA := testpki.New(t, t.TempDir(), "cloud")
	cloud := mosquitto.Start(t, mosquitto.Options{CA: cloudCA})
	sub := mosquitto.Subscribe(t, cloud, "cloud-sub", "bastion/#", false)
	impostor := testpki.New(t, t.TempDir(), "impostor")

	state := filepath.Join(t.TempDir(), "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	leaf := cloudCA.Client(t, gatewayID)
	cfg := gwConfig(t, state, cloud, impostor.CertFile, mosquitto.ServerName, leaf, gatewayID)
	p := startGateway(t, cfg, true)
	const wrongCA = "broker certificate is not signed by a CA in upstream.ca_file " // + path
	line := p.log.wait(t, wrongCA, 0, 15*time.Second)
	if !strings.Contains(line, impostor.CertFile) || !strings.Contains(line, "refusing to connect") {
		t.Errorf("wrong-CA log line does not name the CA file and the refusal: %s", line)
	}

	dev := addDevice(t, state, "meter", "cert")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	mc, err := dev.DialMQTT(ctx, cfg.MQTT.Listen, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close()
	for i := range n {
		rc, err := mc.Publish(ctx, mc.TelemetryTopic("seq"), 1, []byte(itoa(i)))
		if err != nil || rc != 0 {
			t.Fatalf("publish %d with the upstream refused: rc 0x%02x, %v (the device must still be acknowledged)", i, rc, err)
		}
	}
	checkHeld := func(what string) {
		t.Helper()
		st := bastionctlStatus(t, state)
		if d := st.Components.Upstream.Queue.Depth; d != n {
			t.Errorf("%s: bastionctl status queue depth %d, want %d", what, d, n)
		}
		link := st.Components.Upstream.Link
		if link.Connected || link.Published != 0 {
			t.Errorf("%s: link connected=%v published=%d, want not connected and nothing published", what, link.Connected, link.Published)
		}
		if !strings.Contains(link.LastError, "refusing to connect") {
			t.Errorf("%s: bastionctl status last_error %q does not say why", what, link.LastError)
		}
	}
	// A failed attempt after the messages were queued proves the link
	// tried with them in the queue.
	p.log.wait(t, wrongCA, p.log.count(wrongCA), 15*time.Second)
	checkHeld("wrong CA")

	// Right CA, wrong name: a SIGHUP reload swaps the configuration.
	cfg.Upstream.CAFile, cfg.Upstream.ServerName = cloudCA.CertFile, "not-the-broker.example"
	if err := gateway.WriteConfigFile(filepath.Join(state, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	// The log is slog text: the quotes inside err="..." are escaped.
	const wrongName = `broker certificate is not valid for upstream.server_name \"not-the-broker.example\"; refusing to connect`
	p.log.wait(t, wrongName, 0, 15*time.Second)
	p.log.wait(t, wrongName, 1, 15*time.Second)
	checkHeld("wrong server name")
	if k := len(sub.Got); k != 0 {
		t.Fatalf("the cloud subscriber got %d messages from a gateway that must not have connected", k)
	}
	if strings.Contains(cloud.Log(), "u'"+gatewayID+"'") {
		t.Fatalf("broker log shows the gateway connected:\n%s", cloud.Log())
	}

	// The right name: the held messages arrive, in order.
	cfg.Upstream.ServerName = mosquitto.ServerName
	if err := gateway.WriteConfigFile(filepath.Join(state, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGHUP)
	for i := range n {
		select {
		case m := <-sub.Got:
			var v int
			if err := json.Unmarshal(m.Payload, &v); err != nil || v != i {
				t.Fatalf("cloud message %d: payload %q, want %d", i, m.Payload, i)
			}
			if want := "bastion/" + gatewayID + "/" + dev.ID + "/t/seq"; m.Topic != want {
				t.Fatalf("cloud topic %q, want %q", m.Topic, want)
			}
		case <-ctx.Done():
			t.Fatalf("after the fix only %d of %d held messages arrived; log:\n%s", i, n, p.log)
		}
	}
	p.stop()
}

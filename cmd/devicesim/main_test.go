package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startGateway runs a dev gateway on free loopback ports.
func startGateway(t *testing.T) *gateway.Gateway {
	return startGatewayWith(t, filepath.Join(t.TempDir(), "state"), nil)
}

// startGatewayWith runs a dev gateway on free loopback ports with its state
// in dir, after edit (if any) changed its configuration.
func startGatewayWith(t *testing.T, dir string, edit func(*config.Config)) *gateway.Gateway {
	return startGatewaySink(t, dir, edit, nil)
}

// startGatewaySink is startGatewayWith with sink (if not nil) receiving
// the devices' telemetry.
func startGatewaySink(t *testing.T, dir string, edit func(*config.Config), sink bridges.Sink) *gateway.Gateway {
	os.MkdirAll(dir, 0o700)
	c := config.Dev(dir)
	c.CoAP.Listen, c.CoAP.PSKListen, c.MQTT.Listen, c.Console.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	if edit != nil {
		edit(&c)
	}
	if err := gateway.WriteConfigFile(filepath.Join(dir, "bastion.yaml"), c); err != nil {
		t.Fatal(err)
	}
	ready := make(chan *gateway.Gateway, 1)
	g, err := gateway.New(gateway.Options{Dev: true, StateDir: dir, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Out: io.Discard, Sink: sink, Ready: func(g *gateway.Gateway) { ready <- g }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("gateway Run: %v", err)
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("gateway stopped: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("gateway not ready")
	}
	return g
}

func TestDevicesimCommand(t *testing.T) {
	g := startGateway(t)
	dir := t.TempDir()
	var out, errb bytes.Buffer
	if rc := run([]string{"keygen", filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.csr")}, &out, &errb); rc != 0 {
		t.Fatalf("keygen: %d %s", rc, errb.String())
	}
	csr, _ := os.ReadFile(filepath.Join(dir, "c.csr"))
	cc, err := g.Devices().Add(gateway.AddRequest{Name: "sim-cert", Auth: "cert", CSR: string(csr)}, gateway.Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := g.Devices().Add(gateway.AddRequest{Name: "sim-psk", Auth: "psk"}, gateway.Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, v any) string {
		b, _ := json.Marshal(v)
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o600)
		return p
	}
	certCreds, pskCreds := write("cert.json", cc), write("psk.json", pc)
	ca := filepath.Join(dir, "ca.pem")
	os.WriteFile(ca, []byte(cc.CAPEM), 0o600)
	addrs := g.Addrs()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"coap psk", []string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "--ca", ca, "publish", "temp", "21"}, ""},
		{"coap psk load", []string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "--count", "50", "--rate", "1000", "publish", "temp", "21"}, "sent 50, accepted 50, refused 0"},
		{"coap cert", []string{"--coap", "--creds", certCreds, "--key", filepath.Join(dir, "k.pem"), "--addr", addrs["coaps"], "publish", "devices/" + cc.ID + "/t/x", "1"}, ""},
		{"mqtt cert load", []string{"--mqtt", "--creds", certCreds, "--key", filepath.Join(dir, "k.pem"), "--addr", addrs["mqtts"], "--count", "100", "publish", "x", "1"}, "sent 100, accepted 100, refused 0"},
	} {
		out.Reset()
		errb.Reset()
		if rc := run(tc.args, &out, &errb); rc != 0 {
			t.Errorf("%s: exit %d: %s", tc.name, rc, errb.String())
			continue
		}
		if !strings.Contains(out.String(), tc.want) {
			t.Errorf("%s: output %q, want %q", tc.name, out.String(), tc.want)
		}
	}
	// Publishing into another device's tree is refused by the gateway.
	errb.Reset()
	if rc := run([]string{"--mqtt", "--creds", certCreds, "--key", filepath.Join(dir, "k.pem"), "--addr", addrs["mqtts"], "publish", "devices/" + pc.ID + "/t/x", "1"}, &out, &errb); rc != 1 || !strings.Contains(errb.String(), "refused") {
		t.Errorf("publish into another device's tree: exit %d, stderr %q; want 1 and refused", rc, errb.String())
	}
	// A load run exits 1 unless every message was acknowledged: all of
	// them refused, or the --limit ending the run before they were sent.
	errb.Reset()
	if rc := run([]string{"--mqtt", "--creds", certCreds, "--key", filepath.Join(dir, "k.pem"), "--addr", addrs["mqtts"], "--count", "3", "publish", "devices/" + pc.ID + "/t/x", "1"}, &out, &errb); rc != 1 || !strings.Contains(errb.String(), "0 of 3 messages acknowledged: 3 refused") {
		t.Errorf("3 messages into another device's tree: exit %d, stderr %q; want 1 and 3 refused", rc, errb.String())
	}
	errb.Reset()
	// One message every 1,000 s: the second is due long after the limit.
	if rc := run([]string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "--count", "3", "--rate", "0.001", "--limit", "1s", "publish", "temp", "21"}, &out, &errb); rc != 1 || !strings.Contains(errb.String(), "not sent (the 1s limit ran out)") {
		t.Errorf("3 messages cut short by --limit: exit %d, stderr %q; want 1 and the limit as the reason", rc, errb.String())
	}
	// Usage errors exit 2; a refused device exits 1 with the reason.
	if rc := run([]string{"--coap", "--mqtt", "publish"}, &out, &errb); rc != 2 {
		t.Errorf("both transports: exit %d, want 2", rc)
	}
	if _, err := g.Devices().Revoke(pc.ID, gateway.Actor{Name: "test"}); err != nil {
		t.Fatal(err)
	}
	errb.Reset()
	if rc := run([]string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "publish", "temp", "1"}, &out, &errb); rc != 1 || !strings.Contains(errb.String(), "handshake") {
		t.Errorf("revoked device: exit %d, stderr %q; want 1 and a handshake error", rc, errb.String())
	}
}

func TestTelemetryPath(t *testing.T) {
	for in, want := range map[string]string{"temp": "temp|true", "room/temp": "room/temp|true",
		"devices/d1/t/x": "x|true", "devices/d2/t/x": "devices/d2/t/x|false"} {
		p, ok := telemetryPath("d1", in)
		if got := p + "|" + map[bool]string{true: "true", false: "false"}[ok]; got != want {
			t.Errorf("telemetryPath(d1, %q) = %s, want %s", in, got, want)
		}
	}
}

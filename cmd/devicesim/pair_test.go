package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
)

// The whole setup-code flow through the command line: a person registers
// the code, presses the (dev FIFO) button, the device pairs and publishes
// with the credentials file pair wrote.
func TestPairCommand(t *testing.T) {
	g := startGateway(t)
	dir := t.TempDir()
	addrs := g.Addrs()
	var out, errb bytes.Buffer
	creds := filepath.Join(dir, "paired.json")
	pair := []string{"pair", "--code", "1234-5678-90", "--id", "sim-label-1", "--addr", addrs["coaps_psk"], "--out", creds, "--limit", "10s"}
	if rc := run(pair, &out, &errb); rc != 1 {
		t.Fatalf("pair with no window: exit %d (%s), want 1", rc, errb.String())
	}
	now := time.Now()
	if _, err := g.Store().ExpectDevice(store.ExpectedDevice{Name: "sim-thermo", Code: "1234-5678-90", Created: now, Expires: now.Add(time.Hour), By: "test"}); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(g.Config().StateDir, config.DevButtonFIFO)
	if rc := run([]string{"press-button", "--fifo", fifo, "--hold", "1.5s"}, &out, &errb); rc != 0 {
		t.Fatalf("press-button: exit %d: %s", rc, errb.String())
	}
	open := false
	for i := 0; i < 500 && !open; i++ {
		open = g.Status().Components["pairing"].(map[string]any)["open"] == true
		if !open {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if !open {
		t.Fatal("the press did not open the pairing window within 5s")
	}
	out.Reset()
	errb.Reset()
	// A world-readable file where the credentials go: pair replaces it
	// with a 0600 one (os.WriteFile would keep its mode).
	if err := os.WriteFile(creds, []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(creds, 0o644); err != nil {
		t.Fatal(err)
	}
	if rc := run(pair, &out, &errb); rc != 0 || !strings.Contains(out.String(), "paired: device ") {
		t.Fatalf("pair: exit %d, out %q, err %q", rc, out.String(), errb.String())
	}
	checkSecret(t, creds, `"id"`)
	for _, args := range [][]string{
		{"--coap", "--creds", creds, "--addr", addrs["coaps"], "publish", "temp", "21"},
		{"--mqtt", "--creds", creds, "--addr", addrs["mqtts"], "publish", "temp", "21"},
	} {
		errb.Reset()
		if rc := run(args, &out, &errb); rc != 0 {
			t.Errorf("%v with the paired credentials: exit %d: %s", args[:1], rc, errb.String())
		}
	}
	ds, _ := g.Devices().List()
	if len(ds) != 1 || ds[0].Name != "sim-thermo" {
		t.Errorf("devices = %+v, want the one paired as sim-thermo", ds)
	}
	// Usage errors.
	if rc := run([]string{"pair", "--code", "x"}, &out, &errb); rc != 2 {
		t.Errorf("pair without --id/--out: exit %d, want 2", rc)
	}
	if rc := run([]string{"press-button"}, &out, &errb); rc != 2 {
		t.Errorf("press-button without --fifo: exit %d, want 2", rc)
	}
}

// An MQTT-only device pairs with its setup code over HTTPS (pair --https)
// and publishes over MQTT with the credentials pair wrote.
func TestPairHTTPSCommand(t *testing.T) {
	g := startGatewayWith(t, filepath.Join(t.TempDir(), "state"), func(c *config.Config) { c.Pairing.ESTListen = "127.0.0.1:0" })
	dir := t.TempDir()
	var out, errb bytes.Buffer
	creds := filepath.Join(dir, "paired.json")
	if rc := run([]string{"pair", "--https", "--code", "1234-5678-90", "--id", "sim-label-1", "--out", creds}, &out, &errb); rc != 2 {
		t.Errorf("pair --https without --addr: exit %d, want 2", rc)
	}
	now := time.Now()
	if _, err := g.Store().ExpectDevice(store.ExpectedDevice{Name: "sim-meter", Code: "1234-5678-90", Created: now, Expires: now.Add(time.Hour), By: "test"}); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(g.Config().StateDir, config.DevButtonFIFO)
	if rc := run([]string{"press-button", "--fifo", fifo, "--hold", "1.5s"}, &out, &errb); rc != 0 {
		t.Fatalf("press-button: exit %d: %s", rc, errb.String())
	}
	var est string
	for i := 0; i < 500 && est == ""; i++ {
		est, _ = g.Status().Components["pairing"].(map[string]any)["est_https"].(string)
		if est == "" {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if est == "" {
		t.Fatal("EST over HTTPS did not open with the window within 5s")
	}
	pair := []string{"pair", "--https", "--code", "1234-5678-90", "--id", "sim-label-1", "--addr", est, "--out", creds, "--limit", "20s"}
	if rc := run(pair, &out, &errb); rc != 0 || !strings.Contains(out.String(), "paired: device ") {
		t.Fatalf("pair --https: exit %d, out %q, err %q", rc, out.String(), errb.String())
	}
	checkSecret(t, creds, `"ca_pem"`)
	errb.Reset()
	if rc := run([]string{"--mqtt", "--creds", creds, "--addr", g.Addrs()["mqtts"], "publish", "temp", "21"}, &out, &errb); rc != 0 {
		t.Errorf("MQTT publish with the credentials paired over HTTPS: exit %d: %s", rc, errb.String())
	}
	ds, _ := g.Devices().List()
	if len(ds) != 1 || ds[0].Name != "sim-meter" {
		t.Errorf("devices = %+v, want the one paired as sim-meter", ds)
	}
}

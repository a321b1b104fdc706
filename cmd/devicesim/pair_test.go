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

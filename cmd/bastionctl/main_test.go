package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
)

func startGateway(t *testing.T) string {
	t.Helper()
	state := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(state, 0o700)
	cfg := config.Dev(state)
	cfg.CoAP.Listen, cfg.CoAP.PSKListen, cfg.MQTT.Listen, cfg.Console.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	if err := gateway.WriteConfigFile(filepath.Join(state, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	g, err := gateway.New(gateway.Options{Dev: true, StateDir: state, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Out: io.Discard,
		Ready: func(*gateway.Gateway) { close(ready) }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case <-time.After(5 * time.Second):
		t.Fatal("gateway not ready")
	}
	return state
}

func ctl(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return out.String(), errb.String(), code
}

func TestDeviceLifecycle(t *testing.T) {
	state := startGateway(t)
	out, errs, code := ctl(t, "--state", state, "--json", "device", "add", "dev1", "--auth", "psk")
	if code != 0 {
		t.Fatalf("device add: exit %d: %s", code, errs)
	}
	var creds map[string]any
	if err := json.Unmarshal([]byte(out), &creds); err != nil {
		t.Fatalf("--json output is not JSON: %v\n%s", err, out)
	}
	for _, k := range []string{"id", "psk_identity", "psk", "coaps_port"} {
		if creds[k] == nil || creds[k] == "" {
			t.Errorf("device add --json lacks %q: %s", k, out)
		}
	}
	id := creds["id"].(string)

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	csrFile := filepath.Join(t.TempDir(), "dev.csr")
	os.WriteFile(csrFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0o600)
	out, errs, code = ctl(t, "--state", state, "--json", "device", "add", "cam", "--auth", "cert", "--csr", csrFile)
	if code != 0 || !strings.Contains(out, "cert_pem") || !strings.Contains(out, "ca_pem") {
		t.Fatalf("cert device add: exit %d %s %s", code, out, errs)
	}

	if _, errs, code = ctl(t, "--state", state, "device", "revoke", id); code != 0 {
		t.Fatalf("revoke: exit %d: %s", code, errs)
	}
	out, _, _ = ctl(t, "--state", state, "device", "list")
	if !strings.Contains(out, id) || !strings.Contains(out, "revoked") || !strings.Contains(out, "cam") {
		t.Errorf("device list after revoke:\n%s", out)
	}
	if _, errs, code = ctl(t, "--state", state, "device", "revoke", "no-such"); code != 1 || !strings.Contains(errs, "no device") {
		t.Errorf("revoking an unknown id: exit %d %s", code, errs)
	}
	out, _, code = ctl(t, "--state", state, "pki", "show")
	if code != 0 || !strings.Contains(out, "Bastion Root CA") {
		t.Errorf("pki show: %s", out)
	}
	out, _, code = ctl(t, "--state", state, "firewall", "plan")
	if code != 0 || !strings.Contains(out, "firewall.manage: false") || !strings.Contains(out, "bastion:default-drop") {
		t.Errorf("firewall plan (exit %d):\n%s", code, out)
	}
	if _, errs, code := ctl(t, "--state", state, "firewall", "show"); code != 1 || !strings.Contains(errs, "does not manage the firewall") {
		t.Errorf("firewall show when not managed: exit %d %s", code, errs)
	}
	out, _, code = ctl(t, "--state", state, "console", "recover")
	if code != 0 || !strings.Contains(out, "recovery code: ") {
		t.Errorf("console recover (exit %d): %s", code, out)
	}
	out, _, code = ctl(t, "--state", state, "status")
	if code != 0 || !strings.Contains(out, "devices: 1 active, 1 revoked") {
		t.Errorf("status: %s", out)
	}
}

func TestUsageAndUnreachable(t *testing.T) {
	if _, _, code := ctl(t, "frobnicate"); code != 2 {
		t.Errorf("unknown command: exit %d, want 2", code)
	}
	if _, _, code := ctl(t, "device", "add", "x", "--auth", "cert"); code != 2 {
		t.Errorf("cert without --csr: exit %d, want 2", code)
	}
	_, errs, code := ctl(t, "--socket", filepath.Join(t.TempDir(), "nope.sock"), "status")
	if code != 1 || !strings.Contains(errs, "cannot reach bastiond") {
		t.Errorf("unreachable daemon: exit %d: %s", code, errs)
	}
}

// fakeCtl answers bastionctl's API calls from a table.
type fakeCtl map[string]string

func (f fakeCtl) Do(_ context.Context, method, path string, _, out any) ([]byte, error) {
	raw, ok := f[method+" "+path]
	if !ok {
		return nil, fmt.Errorf("unexpected %s %s", method, path)
	}
	if out != nil {
		if err := json.Unmarshal([]byte(raw), out); err != nil {
			return nil, err
		}
	}
	return []byte(raw), nil
}

func TestUpstreamParked(t *testing.T) {
	f := fakeCtl{
		"GET /v1/upstream/parked":        `{"depth":3,"bytes":4096,"messages":[{"seq":7,"device":"d1","topic":"devices/d1/t/big","bytes":900,"received":"2026-11-25T10:00:00Z","why":"PUBACK reason 0x95 (packet too large)"}]}`,
		"POST /v1/upstream/parked/retry": `{"count":3}`,
		"POST /v1/upstream/parked/drop":  `{"count":2}`,
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"upstream", "parked"}, []string{"3 messages parked", "devices/d1/t/big", "0x95 (packet too large)", "and 2 more"}},
		{[]string{"upstream", "parked", "list"}, []string{"3 messages parked"}},
		{[]string{"upstream", "parked", "retry"}, []string{"3 parked messages moved back"}},
		{[]string{"upstream", "parked", "drop"}, []string{"2 parked messages deleted"}},
	} {
		var out bytes.Buffer
		c := &cli{ctl: f, out: &out}
		if err := c.dispatch(context.Background(), tc.args); err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%v: output %q lacks %q", tc.args, out.String(), w)
			}
		}
	}
	c := &cli{ctl: f, out: io.Discard}
	if err := c.dispatch(context.Background(), []string{"upstream", "parked", "purge"}); err == nil {
		t.Error("upstream parked purge: want a usage error")
	}
}

package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// TestFirmwareFetchCommand runs `devicesim ... firmware fetch` against a
// dev gateway whose firmware cache trusts a TUF repository the test made.
func TestFirmwareFetchCommand(t *testing.T) {
	repo := tufrepo.New(t)
	_, vk, _ := ed25519.GenerateKey(rand.Reader)
	cl := otacache.Class{Vendor: "acme", Model: "th-10"}
	img := tufrepo.Image(20*1024+7, 9)
	custom, err := otacache.VendorTargetCustom(cl, "1.0.1", 1, img, vk)
	if err != nil {
		t.Fatal(err)
	}
	repo.AddTarget("fw/acme/th-10/1.0.1.bin", img, custom)
	repo.Publish()

	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	g := startGatewayWith(t, filepath.Join(dir, "state"), func(c *config.Config) {
		c.Firmware.Enabled, c.Firmware.RepositoryURL, c.Firmware.HTTPSListen = true, repo.URL(), "127.0.0.1:0"
		c.Firmware.TrustedRoot, c.Firmware.CABundle = write("root.json", repo.RootJSON()), write("vendor-ca.pem", repo.CertPEM())
	})

	var out, errb bytes.Buffer
	if rc := run([]string{"keygen", filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.csr")}, &out, &errb); rc != 0 {
		t.Fatalf("keygen: %d %s", rc, errb.String())
	}
	csr, _ := os.ReadFile(filepath.Join(dir, "c.csr"))
	pc, err := g.Devices().Add(gateway.AddRequest{Name: "fw-psk", Auth: "psk", Vendor: cl.Vendor, Model: cl.Model}, gateway.Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := g.Devices().Add(gateway.AddRequest{Name: "fw-cert", Auth: "cert", CSR: string(csr), Vendor: cl.Vendor, Model: cl.Model}, gateway.Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Firmware().Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	js := func(v any) []byte { b, _ := json.Marshal(v); return b }
	der, _ := x509.MarshalPKIXPublicKey(vk.Public())
	keyPEM := write("vendor.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	_, wrong, _ := ed25519.GenerateKey(rand.Reader)
	der, _ = x509.MarshalPKIXPublicKey(wrong.Public())
	wrongPEM := write("wrong.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	addrs := g.Addrs()
	pskCreds, certCreds := write("psk.json", js(pc)), write("cert.json", js(cc))
	for _, tc := range []struct {
		name string
		args []string
		rc   int
		want string
	}{
		{"coap", []string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "firmware", "fetch", "--out", filepath.Join(dir, "coap.bin"), "--vendor-key", keyPEM},
			0, "over coap (resumed at 0)"},
		{"mqtt+https", []string{"--mqtt", "--creds", certCreds, "--key", filepath.Join(dir, "k.pem"), "--addr", addrs["mqtts"], "firmware", "fetch",
			"--out", filepath.Join(dir, "https.bin"), "--https", g.FirmwareHTTPSAddr().String(), "--vendor-key", keyPEM}, 0, "over https (resumed at 0)"},
		{"wrong vendor key", []string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "firmware", "fetch", "--out", filepath.Join(dir, "bad.bin"), "--vendor-key", wrongPEM},
			1, "offer acme/th-10 1.0.1"},
		{"no --out", []string{"--coap", "--creds", pskCreds, "--addr", addrs["coaps_psk"], "firmware", "fetch"}, 1, ""},
	} {
		out.Reset()
		errb.Reset()
		if rc := run(tc.args, &out, &errb); rc != tc.rc || !strings.Contains(out.String(), tc.want) {
			t.Errorf("%s: exit %d, output %q, stderr %q; want exit %d and %q", tc.name, rc, out.String(), errb.String(), tc.rc, tc.want)
		}
	}
	for _, f := range []string{"coap.bin", "https.bin"} {
		b, _ := os.ReadFile(filepath.Join(dir, f))
		if sha256.Sum256(b) != sha256.Sum256(img) {
			t.Errorf("%s: %d bytes, not the image", f, len(b))
		}
	}
	st := g.Firmware().DeviceStatuses()
	if st[cc.ID].State != otacache.StateVerified {
		t.Errorf("status of the MQTT device: %+v, want verified", st[cc.ID])
	}
	if st[pc.ID].State != otacache.StateFailed || st[pc.ID].Detail != "verification failed" {
		t.Errorf("status of the CoAP device after the wrong key: %+v, want failed", st[pc.ID])
	}
}

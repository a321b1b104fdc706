package gateway

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/pki"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

// testConfig is a dev configuration on free loopback ports.
func testConfig(dir string) config.Config {
	c := config.Dev(dir)
	c.CoAP.Listen, c.CoAP.PSKListen = "127.0.0.1:0", "127.0.0.1:0"
	c.MQTT.Listen, c.Console.Listen = "127.0.0.1:0", "127.0.0.1:0"
	return c
}

type running struct {
	g      *Gateway
	cancel context.CancelFunc
	done   chan error
	out    *bytes.Buffer
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("gateway did not stop within 10s")
	}
}

func start(t *testing.T, dir string, reload chan struct{}) *running {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, "bastion.yaml")); err != nil {
		os.MkdirAll(dir, 0o700)
		if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), testConfig(dir)); err != nil {
			t.Fatal(err)
		}
	}
	out := &bytes.Buffer{}
	r := runGateway(t, Options{Dev: true, StateDir: dir, Log: discard, Out: out, Reload: reload}, 5*time.Second)
	r.out = out
	return r
}

// runGateway starts a gateway with opts and waits until it is ready, at
// most within.
func runGateway(t testing.TB, opts Options, within time.Duration) *running {
	t.Helper()
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return runGatewayFrom(t, g, within)
}

// runGatewayFrom runs g, made by New, and waits until it is ready, at most
// within.
func runGatewayFrom(t testing.TB, g *Gateway, within time.Duration) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	g.opts.Ready = func(*Gateway) { close(ready) }
	r := &running{g: g, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- g.Run(ctx) }()
	select {
	case <-ready:
	case err := <-r.done:
		t.Fatalf("gateway stopped at start: %v", err)
	case <-time.After(within):
		t.Fatalf("gateway not ready within %s", within)
	}
	return r
}

func deviceCSR(t *testing.T) (*ecdsa.PrivateKey, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func TestDevGatewayServesOnlyTLS(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, dir, nil)
	addrs := r.g.Addrs()
	if !strings.Contains(r.out.String(), "setup code: ") {
		t.Errorf("start-up summary has no setup code:\n%s", r.out)
	}
	for _, k := range []string{"coaps", "coaps_psk", "mqtts", "console"} {
		if !strings.Contains(r.out.String(), addrs[k]) {
			t.Errorf("start-up summary does not show the %s address %s", k, addrs[k])
		}
	}
	roots := r.g.CA().RootPool()

	// Console: TLS with a chain to our root, and plain HTTP gets nothing.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}, Timeout: 5 * time.Second}
	resp, err := hc.Get("https://" + addrs["console"] + "/healthz")
	if err != nil {
		t.Fatalf("console over TLS: %v", err)
	}
	resp.Body.Close()
	if resp.Header.Get("Content-Security-Policy") == "" || resp.Header.Get("Strict-Transport-Security") == "" {
		t.Error("console answers without CSP/HSTS")
	}
	if resp, err := (&http.Client{Timeout: 3 * time.Second}).Get("http://" + addrs["console"] + "/healthz"); err == nil && resp.StatusCode == 200 {
		t.Error("console answered plain HTTP with 200")
	}

	// MQTT: a device certificate from the CA completes a TLS handshake; no
	// certificate, or TLS 1.1, does not.
	key, csr := deviceCSR(t)
	creds, err := r.g.Devices().Add(AddRequest{Name: "sensor", Auth: "cert", CSR: csr}, Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(creds.CertPEM))
	devCert := tls.Certificate{Certificate: [][]byte{blk.Bytes}, PrivateKey: key}
	mqttTLS := func(cfg *tls.Config) error {
		cfg.RootCAs, cfg.ServerName = roots, "127.0.0.1"
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 3 * time.Second}, "tcp", addrs["mqtts"], cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		// TLS 1.3 client auth failures surface on the first read.
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err = c.Read(make([]byte, 1))
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		return err
	}
	if err := mqttTLS(&tls.Config{Certificates: []tls.Certificate{devCert}}); err != nil {
		t.Errorf("MQTT TLS with a device certificate: %v", err)
	}
	if err := mqttTLS(&tls.Config{}); err == nil {
		t.Error("MQTT TLS without a client certificate was accepted")
	}
	if err := mqttTLS(&tls.Config{Certificates: []tls.Certificate{devCert}, MaxVersion: tls.VersionTLS11}); err == nil {
		t.Error("MQTT accepted TLS 1.1")
	}
	if _, err := r.g.Devices().Revoke(creds.ID, Actor{Name: "test"}); err != nil {
		t.Fatal(err)
	}
	if err := mqttTLS(&tls.Config{Certificates: []tls.Certificate{devCert}}); err == nil {
		t.Error("MQTT accepted a revoked device's certificate")
	}

	// CoAP PSK: the credentials bastionctl would hand out complete a DTLS
	// handshake; a wrong key does not.
	pc, err := r.g.Devices().Add(AddRequest{Name: "lamp", Auth: "psk"}, Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if pc.CoAPSPort == 0 || !strings.HasSuffix(addrs["coaps_psk"], ":"+itoa(pc.CoAPSPort)) {
		t.Errorf("coaps_port %d does not match the PSK listener %s", pc.CoAPSPort, addrs["coaps_psk"])
	}
	dtlsPSK := func(key string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		raddr, _ := net.ResolveUDPAddr("udp", addrs["coaps_psk"])
		conn, err := piondtls.Dial("udp", raddr, &piondtls.Config{
			PSK:             func([]byte) ([]byte, error) { return []byte(key), nil },
			PSKIdentityHint: []byte(pc.PSKIdentity),
			CipherSuites:    []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_CCM_8},
		})
		if err != nil {
			return err
		}
		defer conn.Close()
		return conn.HandshakeContext(ctx)
	}
	if err := dtlsPSK(pc.PSKText); err != nil {
		t.Errorf("DTLS PSK handshake with issued credentials: %v", err)
	}
	if err := dtlsPSK("00000000000000000000000000000000"); err == nil {
		t.Error("DTLS PSK handshake with a wrong key succeeded")
	}
	r.stop(t)

	// A second start reuses the CA and the store.
	root := r.g.CA().Root()
	r2 := start(t, dir, nil)
	if !r2.g.CA().Root().Equal(root) {
		t.Error("second start created a new CA")
	}
	if ds, _ := r2.g.Devices().List(); len(ds) != 2 {
		t.Errorf("second start sees %d devices, want 2", len(ds))
	}
	if err := dtlsPSKAgain(r2, pc); err != nil {
		t.Errorf("PSK device after restart: %v", err)
	}
	r2.stop(t)
}

func dtlsPSKAgain(r *running, pc Credentials) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	raddr, _ := net.ResolveUDPAddr("udp", r.g.Addrs()["coaps_psk"])
	conn, err := piondtls.Dial("udp", raddr, &piondtls.Config{
		PSK:             func([]byte) ([]byte, error) { return []byte(pc.PSKText), nil },
		PSKIdentityHint: []byte(pc.PSKIdentity),
		CipherSuites:    []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256},
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.HandshakeContext(ctx)
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestReloadKeepsOldConfigWhenNewIsBad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	reload := make(chan struct{})
	r := start(t, dir, reload)
	defer r.stop(t)
	path := filepath.Join(dir, "bastion.yaml")
	good, _ := os.ReadFile(path)

	os.WriteFile(path, append(good, []byte("\nbogus_key: 1\n")...), 0o600)
	err := r.g.Reload()
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "bogus_key") {
		t.Fatalf("bad reload: got %v, want an error naming %s and bogus_key", err, path)
	}
	if r.g.Config().Log.Level != "info" {
		t.Error("config changed by a refused reload")
	}
	ev, _ := r.g.Store().AuditLog(1, 0)
	if len(ev) == 0 || ev[0].Action != "config.reload_refused" {
		t.Errorf("refused reload not in audit log: %+v", ev)
	}

	os.WriteFile(path, bytes.Replace(good, []byte("level: info"), []byte("level: debug"), 1), 0o600)
	reload <- struct{}{} // through the channel, as SIGHUP does
	deadline := time.Now().Add(5 * time.Second)
	for r.g.Config().Log.Level != "debug" {
		if time.Now().After(deadline) {
			t.Fatal("good config not applied after reload")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestControlSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, dir, nil)
	defer r.stop(t)
	sock := control.SocketPath(dir)
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	c := control.New(sock)
	ctx := context.Background()
	var creds Credentials
	if _, err := c.Do(ctx, "POST", "/v1/devices", AddRequest{Name: "dev1", Auth: "psk"}, &creds); err != nil {
		t.Fatal(err)
	}
	if creds.ID == "" || creds.PSKIdentity == "" || len(creds.PSK) != 64 || creds.CoAPSPort == 0 {
		t.Errorf("psk credentials incomplete: %+v", creds)
	}
	_, csr := deviceCSR(t)
	var cc Credentials
	if _, err := c.Do(ctx, "POST", "/v1/devices", AddRequest{Name: "dev2", Auth: "cert", CSR: csr}, &cc); err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(cc.CertPEM))
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil || !strings.Contains(cc.CAPEM, "BEGIN CERTIFICATE") {
		t.Fatalf("cert credentials: %v", err)
	}
	if id, _ := pki.DeviceIDOf(cert); id != cc.ID {
		t.Errorf("certificate names %q, device id is %q", id, cc.ID)
	}
	for name, req := range map[string]AddRequest{
		"duplicate name": {Name: "dev1", Auth: "psk"},
		"bad auth":       {Name: "x", Auth: "password"},
		"bad csr":        {Name: "y", Auth: "cert", CSR: "nope"},
		"empty name":     {Name: "", Auth: "psk"},
	} {
		if _, err := c.Do(ctx, "POST", "/v1/devices", req, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := c.Do(ctx, "POST", "/v1/devices/"+creds.ID+"/revoke", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.g.identity().PSK([]byte(creds.PSKIdentity)); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("revoked PSK device still accepted: %v", err)
	}
	if _, err := c.Do(ctx, "POST", "/v1/devices/nope/revoke", nil, nil); err == nil || !strings.Contains(err.Error(), "no device") {
		t.Errorf("revoking an unknown id: %v", err)
	}
	var st Status
	if _, err := c.Do(ctx, "GET", "/v1/status", nil, &st); err != nil || st.Devices != 1 || st.RevokedDevices != 1 || !st.AdminSetupPending {
		t.Errorf("status = %+v, %v", st, err)
	}
	raw, err := c.Do(ctx, "GET", "/metrics", nil, nil)
	if err != nil || !bytes.Contains(raw, []byte("bastion_devices 1")) {
		t.Errorf("metrics: %v\n%s", err, raw)
	}
	ev, _ := r.g.Store().AuditLog(10, 0)
	if len(ev) < 3 || ev[0].Action != "device.revoke" || ev[0].Actor != "bastionctl" {
		t.Errorf("audit log: %+v", ev)
	}
}

func TestSetupCode(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, dir, nil)
	defer r.stop(t)
	code := r.g.setupCode
	if len(code) != 19 || !r.g.CheckSetupCode(code) || !r.g.CheckSetupCode(strings.ToLower(code)) {
		t.Fatalf("setup code %q not accepted", code)
	}
	if r.g.CheckSetupCode("AAAA-AAAA-AAAA-AAAA") || r.g.CheckSetupCode("") {
		t.Error("wrong setup code accepted")
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "bastion.db"))
	if bytes.Contains(raw, []byte(code)) {
		t.Error("setup code stored in clear")
	}
}

func TestSecretHash(t *testing.T) {
	h := HashSecret([]byte("s3cret"), []byte("0123456789abcdef"))
	c := newSecretChecker(1, time.Second)
	ok1, err1 := c.check(h, []byte("s3cret"))
	ok2, err2 := c.check(h, []byte("s3cre"))
	_, err3 := c.check("junk", nil)
	if !ok1 || err1 != nil || ok2 || err2 != nil || err3 == nil {
		t.Errorf("argon2id secret check: right %v %v, wrong %v %v, junk %v", ok1, err1, ok2, err2, err3)
	}
}

func TestBadConfigRefusedAtStart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	p := filepath.Join(dir, "bastion.yaml")
	os.WriteFile(p, []byte("mqtt:\n  listen: \":1883\"\n"), 0o600)
	_, err := New(Options{Dev: true, StateDir: dir, Log: discard, Out: io.Discard})
	if err == nil || !strings.Contains(err.Error(), p+":2: mqtt.listen") {
		t.Fatalf("got %v, want an error naming %s:2 and mqtt.listen", err, p)
	}
	_, err = New(Options{ConfigPath: filepath.Join(dir, "missing.yaml"), Log: discard, Out: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Fatalf("missing config: %v", err)
	}
}

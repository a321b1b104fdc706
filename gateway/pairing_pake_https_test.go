package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// startESTPairing starts a pairing gateway with EST over HTTPS on.
func startESTPairing(t *testing.T) *pgw {
	t.Helper()
	return startPairing(t, func(c *config.Config) { c.Pairing.ESTListen = "127.0.0.1:0" })
}

// openESTWindow presses the button and returns the EST listener's address.
func (g *pgw) openESTWindow(t *testing.T) string {
	t.Helper()
	g.press(t, 1500*time.Millisecond)
	waitFor(t, "EST over HTTPS opens with the window", func() bool { return g.g.pairing.ESTAddr() != "" })
	return g.g.pairing.ESTAddr()
}

// estClient is a test's own client of the EST listener, which (unlike a
// device) knows the gateway's root.
func (g *pgw) estClient(t *testing.T) *http.Client {
	hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS13, RootCAs: g.g.CA().RootPool(), ServerName: "127.0.0.1"}}}
	t.Cleanup(hc.CloseIdleConnections)
	return hc
}

func estPost(t *testing.T, hc *http.Client, addr, path, id string, body []byte) (int, []byte) {
	t.Helper()
	resp, err := hc.Post("https://"+addr+path+"?device="+url.QueryEscape(id), "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// An MQTT-only device with only a setup code pairs over HTTPS while the
// window is open, then publishes with its new certificate.
func TestPairingSetupCodeHTTPS(t *testing.T) {
	g := startESTPairing(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	addr := g.openESTWindow(t)

	var run devicesim.HTTPSRun
	c, err := devicesim.PairCodeHTTPS(ctx, addr, "acme-m1", goodCode, devicesim.HTTPSOptions{Run: &run})
	if err != nil {
		t.Fatalf("pair over HTTPS with the setup code: %v", err)
	}
	if r := g.lastClose(t); r != pairing.ReasonEnrolled {
		t.Errorf("window closed for %q, want enrolled", r)
	}
	dev, err := g.g.Store().Device(c.ID)
	if err != nil || dev.Name != "thermo" || dev.Auth != "cert" {
		t.Errorf("device record = %+v %v, want thermo/cert", dev, err)
	}
	if es, _ := g.g.Store().ExpectedDevices(); len(es) != 0 {
		t.Errorf("expected devices after enrollment = %v, want none (the code is spent)", es)
	}
	if adds := g.audited(t, "device.add"); len(adds) != 1 || !strings.Contains(adds[0].Detail, "method=setup-code-https") {
		t.Errorf("device.add audit = %+v, want one with method=setup-code-https", adds)
	}
	if len(g.audited(t, "pairing.pake_done")) != 1 {
		t.Error("the exchange is not audited as on CoAPS (pairing.pake_done)")
	}
	if !strings.Contains(c.CAPEM, string(pki.CertPEM(g.g.CA().Root()))) {
		t.Error("the sealed answer did not carry the gateway's root")
	}
	waitFor(t, "EST over HTTPS closes with the window", func() bool { return g.g.pairing.ESTAddr() == "" })
	g.publishBoth(t, c)

	// Replays into a new window: the hello proves nothing and is answered;
	// the earlier round 2 fails confirmation against the new shares and
	// counts as a failed attempt; the earlier enrollment request does not
	// open under the new exchange's keys, nor on another connection.
	g.expect(t, "thermo2", goodCode)
	addr = g.openESTWindow(t)
	hc := g.estClient(t)
	if st, b := estPost(t, hc, addr, est.PathPAKE, "acme-m1", run.Hello); st != http.StatusOK {
		t.Fatalf("replayed hello = %d %s, want 200", st, b)
	}
	if st, _ := estPost(t, hc, addr, est.PathPAKE, "acme-m1", run.Round2); st != http.StatusForbidden {
		t.Fatalf("replayed round 2 = %d, want 403", st)
	}
	if st := g.g.pairing.win.State(); st.Failures != 1 || !st.Open {
		t.Fatalf("after the replayed round 2: failures %d open %v, want 1 and open", st.Failures, st.Open)
	}
	// The listener takes handshakes without a certificate now; an IDevID
	// enrollment still needs one.
	if st, _ := estPost(t, hc, addr, estEnrollPath, "acme-m1", []byte("MIIB")); st != http.StatusUnauthorized {
		t.Errorf("simpleenroll without a client certificate = %d, want 401", st)
	}
	// A fresh exchange for the same device, then the old sealed CSR.
	httpsPAKE(ctx, t, hc, addr, "acme-m1", goodCode)
	before := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("bad seal"))
	if st, b := estPost(t, hc, addr, est.PathPAKEEnroll, "acme-m1", run.Enroll); st != http.StatusForbidden {
		t.Fatalf("replayed enrollment request = %d %s, want 403", st, b)
	}
	if got := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("bad seal")) - before; got != 1 {
		t.Errorf("messages_refused{bad seal} rose by %v, want 1", got)
	}
	if ds, _ := g.g.Devices().List(); len(ds) != 1 {
		t.Errorf("devices after the replays = %d, want only the first", len(ds))
	}
	if st := g.g.pairing.win.State(); !st.Open || st.Failures != 1 || st.Enrolling != "acme-m1" {
		t.Errorf("after a refused seal: open %v failures %d enrolling %q, want the device's attempt untouched", st.Open, st.Failures, st.Enrolling)
	}
}

// httpsPAKE runs the exchange as a device would, with the test's client.
func httpsPAKE(ctx context.Context, t *testing.T, hc *http.Client, addr, id, code string) []byte {
	t.Helper()
	secret, err := pairing.DeriveSetupSecret([]byte(code), id, spake2plus.DefaultKDFParams)
	if err != nil {
		t.Fatal(err)
	}
	d := &pairing.Device{ID: id, Role: pairing.GatewayProver, Verifier: secret.VerifierRecord(), Rand: rand.Reader}
	hello, _ := d.Hello()
	st, r1 := estPost(t, hc, addr, est.PathPAKE, id, hello)
	if st != http.StatusOK {
		t.Fatalf("hello = %d %s", st, r1)
	}
	round2, err := d.Round1(r1)
	if err != nil {
		t.Fatal(err)
	}
	st, r2 := estPost(t, hc, addr, est.PathPAKE, id, round2)
	if st != http.StatusOK {
		t.Fatalf("round 2 = %d %s", st, r2)
	}
	_, psk, _, err := d.Done(r2)
	if err != nil {
		t.Fatal(err)
	}
	return psk
}

// A wrong code is refused and counted like on CoAPS: ten close the window.
func TestPairingSetupCodeHTTPSWrongCode(t *testing.T) {
	g := startESTPairing(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	g.expect(t, "lamp", goodCode)
	addr := g.openESTWindow(t)
	for i := 1; i <= pairing.DefaultMaxFailures; i++ {
		if _, err := devicesim.PairCodeHTTPS(ctx, addr, "acme-l1", "WRONG-CODE-0000", devicesim.HTTPSOptions{}); err == nil {
			t.Fatalf("attempt %d with a wrong code succeeded", i)
		}
		if open := g.g.pairing.win.IsOpen(); open != (i < pairing.DefaultMaxFailures) {
			t.Fatalf("after %d wrong codes the window open = %v", i, open)
		}
	}
	if r := g.lastClose(t); r != pairing.ReasonTooManyFailures {
		t.Fatalf("window closed for %q, want too many failures", r)
	}
	if n := len(g.audited(t, string(pairing.StepAttemptFailed))); n < pairing.DefaultMaxFailures {
		t.Errorf("%d failed attempts audited, want >= %d", n, pairing.DefaultMaxFailures)
	}
	if ds, _ := g.g.Devices().List(); len(ds) != 0 {
		t.Errorf("devices after only wrong codes: %v", ds)
	}
	// The listener went with the window: a device finds nothing to talk to.
	waitFor(t, "EST over HTTPS closes with the window", func() bool { return g.g.pairing.ESTAddr() == "" })
	if _, err := devicesim.PairCodeHTTPS(ctx, addr, "acme-l1", goodCode, devicesim.HTTPSOptions{}); err == nil {
		t.Fatal("paired over HTTPS with no window open")
	}
}

// A request that reaches the handlers with no window open (one in flight
// as the window closed) is refused before any work, counted and audited.
func TestPairingSetupCodeHTTPSNoWindow(t *testing.T) {
	g := startESTPairing(t)
	g.expect(t, "lamp", goodCode)
	h := g.g.pairing.estHandler()
	hello, _ := (pairing.PAKEMessage{Type: pairing.MsgHello, ID: []byte("acme-l1")}).MarshalBinary()
	for _, path := range []string{est.PathPAKE, est.PathPAKEEnroll} {
		before := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("no window"))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", path+"?device=acme-l1", bytes.NewReader(hello)))
		if rec.Code != http.StatusForbidden {
			t.Errorf("POST %s with no window = %d, want 403", path, rec.Code)
		}
		if got := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("no window")) - before; got != 1 {
			t.Errorf("POST %s with no window: messages_refused{no window} rose by %v, want 1", path, got)
		}
	}
	if len(g.audited(t, "pairing.message_refused")) == 0 {
		t.Error("refused messages not audited")
	}
	if st := g.g.pairing.win.State(); st.Open || st.Enrolling != "" {
		t.Errorf("window state after refused requests = %+v", st)
	}
}

// The device refuses an answer it cannot authenticate: the gateway's
// confirmation altered, or the sealed certificate and CA chain altered.
func TestPairingSetupCodeHTTPSTamperedAnswer(t *testing.T) {
	g := startESTPairing(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	addr := g.openESTWindow(t)
	flipLast := func(want string, round int) func(string, []byte) []byte {
		n := 0
		return func(path string, b []byte) []byte {
			if path != want {
				return b
			}
			if n++; n != round {
				return b
			}
			b = bytes.Clone(b)
			b[len(b)-40] ^= 1
			return b
		}
	}
	_, err := devicesim.PairCodeHTTPS(ctx, addr, "acme-m1", goodCode, devicesim.HTTPSOptions{Tamper: flipLast(est.PathPAKE, 2)})
	if err == nil || !strings.Contains(err.Error(), "did not prove the setup code") {
		t.Fatalf("altered confirmation: err = %v, want the gateway's proof refused", err)
	}
	if ds, _ := g.g.Devices().List(); len(ds) != 0 {
		t.Fatalf("devices after an unconfirmed exchange: %v", ds)
	}
	// The gateway enrolls (it has the device's proof); the device refuses
	// the altered answer and keeps nothing.
	_, err = devicesim.PairCodeHTTPS(ctx, addr, "acme-m1", goodCode, devicesim.HTTPSOptions{Tamper: flipLast(est.PathPAKEEnroll, 1)})
	if err == nil || !strings.Contains(err.Error(), "not the gateway's") {
		t.Fatalf("altered answer: err = %v, want it refused as not the gateway's", err)
	}
}

// A man in the middle that terminates TLS with a certificate of its own
// (the device accepts any) and relays every byte: the PAKE goes through,
// but the enrollment request's seal names the device's connection to the
// relay, not the relay's to the gateway, and is refused.
func TestPairingSetupCodeHTTPSRelayRefused(t *testing.T) {
	g := startESTPairing(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	addr := g.openESTWindow(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{testpki.SelfSigned(t, "gateway")}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				up, err := tls.Dial("tcp", addr, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: g.g.CA().RootPool(), ServerName: "127.0.0.1"})
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() {
					io.Copy(up, c)
					up.CloseWrite()
					close(done)
				}()
				io.Copy(c, up)
				c.Close()
				<-done
			})
		}
	})
	before := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("bad seal"))
	_, err = devicesim.PairCodeHTTPS(ctx, ln.Addr().String(), "acme-m1", goodCode, devicesim.HTTPSOptions{})
	if err == nil {
		t.Fatal("paired through a TLS-terminating relay")
	}
	if got := testutil.ToFloat64(g.g.pairing.msgRefused.WithLabelValues("bad seal")) - before; got != 1 {
		t.Errorf("messages_refused{bad seal} rose by %v, want 1 (err %v)", got, err)
	}
	if ds, _ := g.g.Devices().List(); len(ds) != 0 {
		t.Errorf("devices after the relay: %v", ds)
	}
}

// A second device's hello over HTTPS while one is enrolling aborts the
// window, as on CoAPS: the same window rules.
func TestPairingSetupCodeHTTPSOverlap(t *testing.T) {
	g := startESTPairing(t)
	g.expect(t, "lamp", goodCode)
	addr := g.openESTWindow(t)
	hc := g.estClient(t)
	hello := func(id string) int {
		m, _ := (pairing.PAKEMessage{Type: pairing.MsgHello, ID: []byte(id)}).MarshalBinary()
		st, _ := estPost(t, hc, addr, est.PathPAKE, id, m)
		return st
	}
	if st := hello("acme-l1"); st != http.StatusOK {
		t.Fatalf("first hello = %d, want 200", st)
	}
	if st := hello("intruder-9"); st != http.StatusForbidden {
		t.Fatalf("second device's hello = %d, want 403", st)
	}
	if r := g.lastClose(t); r != pairing.ReasonSessionOverlap {
		t.Fatalf("window closed for %q, want session overlap", r)
	}
	if al := g.audited(t, string(pairing.StepOverlapAlert)); len(al) != 1 {
		t.Errorf("overlap alerts audited = %d, want 1", len(al))
	}
}

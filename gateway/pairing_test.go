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
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/clock"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

type pgw struct {
	*tgw
	pclock *clock.Fake
	fifo   string
}

// startPairing starts a dev gateway whose button is the dev FIFO and whose
// pairing window runs on a fake clock (only the timeout test moves it).
func startPairing(t *testing.T, mutate func(*config.Config)) *pgw {
	t.Helper()
	return startPairingWith(t, mutate, nil)
}

// startPairingWith also runs before on the gateway before it serves.
func startPairingWith(t *testing.T, mutate func(*config.Config), before func(*Gateway)) *pgw {
	t.Helper()
	pc := clock.NewFake(time.Now())
	return startPairingClock(t, mutate, before, pc, pc)
}

// startPairingClock runs the window on clk, which reads the time of fake
// (pgw.pclock).
func startPairingClock(t *testing.T, mutate func(*config.Config), before func(*Gateway), clk clock.Clock, pc *clock.Fake) *pgw {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	cfg := testConfig(dir)
	if mutate != nil {
		mutate(&cfg)
	}
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	lb := &logbuf.Buffer{}
	sink := &testSink{}
	g, err := New(Options{Dev: true, StateDir: dir, Log: slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Out: &bytes.Buffer{}, Sink: sink, Clock: &testpki.OffsetClock{}, PairingClock: clk})
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(g)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	g.opts.Ready = func(*Gateway) { close(ready) }
	r := &running{g: g, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- g.Run(ctx) }()
	select {
	case <-ready:
	case err := <-r.done:
		t.Fatalf("gateway stopped at start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("gateway not ready within 10s")
	}
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("gateway log:\n%s", lb.String())
		}
	})
	fifo := filepath.Join(dir, config.DevButtonFIFO)
	if fi, err := os.Stat(fifo); err != nil || fi.Mode()&os.ModeNamedPipe == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("dev button FIFO %s: %v %v, want a 0600 FIFO", fifo, fi.Mode(), err)
	}
	return &pgw{tgw: &tgw{running: r, log: lb, dir: dir, sink: sink}, pclock: pc, fifo: fifo}
}

// press holds the button for hold and waits (bounded) until the press is
// in the audit log (written after the window changed state).
func (g *pgw) press(t *testing.T, hold time.Duration) {
	t.Helper()
	count := func() int {
		es, _ := g.g.Store().AuditLog(10000, 0)
		n := 0
		for _, e := range es {
			if e.Actor == "button" || e.Action == string(pairing.StepButtonIgnored) || e.Action == string(pairing.StepLongPressIdle) {
				n++
			}
		}
		return n
	}
	before := count()
	if err := devicesim.PressButton(g.fifo, hold, button.KeyWPSButton); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 500; i++ {
		if count() != before {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the button press was not audited within 5s")
}

func (g *pgw) expect(t *testing.T, name, code string) {
	t.Helper()
	now := time.Now()
	if _, err := g.g.Store().ExpectDevice(store.ExpectedDevice{Name: name, Code: code, Created: now, Expires: now.Add(time.Hour), By: "test"}); err != nil {
		t.Fatal(err)
	}
}

func (g *pgw) audited(t *testing.T, action string) []store.Event {
	t.Helper()
	es, err := g.g.Store().AuditLog(1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []store.Event
	for _, e := range es {
		if e.Action == action {
			out = append(out, e)
		}
	}
	return out
}

func (g *pgw) lastClose(t *testing.T) pairing.Reason {
	t.Helper()
	st := g.g.pairing.win.State()
	if st.Open || st.LastClose == nil {
		t.Fatalf("window open=%v, last close %v; want closed", st.Open, st.LastClose)
	}
	return st.LastClose.Reason
}

// publishBoth proves the new credentials work on CoAPS and MQTT.
func (g *pgw) publishBoth(t *testing.T, c devicesim.Creds) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	d := &devicesim.Device{Creds: c}
	co, err := d.DialCoAP(ctx, g.g.Addrs()["coaps"])
	if err != nil {
		t.Fatalf("CoAPS with the enrolled certificate: %v", err)
	}
	defer co.Close()
	if r, err := co.Publish(ctx, "temp", []byte("21")); err != nil || r.Code != codes.Changed {
		t.Fatalf("CoAPS publish: %v %v", r.Code, err)
	}
	mq, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatalf("MQTT with the enrolled certificate: %v", err)
	}
	defer mq.Close()
	if rc, err := mq.Publish(ctx, mq.TelemetryTopic("hum"), 1, []byte("40")); err != nil || rc != 0 {
		t.Fatalf("MQTT publish: rc %#x %v", rc, err)
	}
	var got []string
	for _, m := range g.sink.messages() {
		if m.Device == c.ID {
			got = append(got, m.Topic)
		}
	}
	want := []string{"devices/" + c.ID + "/t/temp", "devices/" + c.ID + "/t/hum"}
	if !slices.Equal(got, want) {
		t.Errorf("sink topics of %s = %v, want %v", c.ID, got, want)
	}
}

const goodCode = "ABCD-1234-EFGH"

func TestPairingSetupCode(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	psk := g.g.Addrs()["coaps_psk"]
	g.expect(t, "thermo", goodCode)

	// No window: the PAKE session itself is refused at the handshake.
	if _, err := devicesim.PairCode(ctx, psk, "acme-t1", goodCode, devicesim.PairOptions{}); err == nil {
		t.Fatal("pairing succeeded with no window open")
	}
	if n := testutil.ToFloat64(g.g.pairing.refused.WithLabelValues("no window")); n < 1 {
		t.Errorf("refused{no window} = %v, want >= 1", n)
	}
	if len(g.audited(t, "pairing.session_refused")) == 0 {
		t.Error("refused session not audited")
	}

	g.press(t, 1500*time.Millisecond)
	if !g.g.pairing.win.IsOpen() {
		t.Fatal("a 1.5 s press did not open the window")
	}
	if e := g.audited(t, string(pairing.StepOpened)); len(e) != 1 || e[0].Actor != "button" {
		t.Fatalf("window_opened audit = %+v, want one by the button", e)
	}
	// A PAKE session reaches only the PAKE resource.
	s, err := devicesim.DialPSK(ctx, psk, pairing.PAKEIdentityPrefix+"acme-t1", pairing.PublicPAKEPSK("acme-t1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/t/x", "/.well-known/est/sen", "/.well-known/est/crts"} {
		if r, err := s.Do(ctx, codes.POST, p, []byte("1"), int(message.AppOctets)); err != nil || r.Code != codes.Forbidden {
			t.Errorf("PAKE session POST %s = %v %v, want 4.03", p, r.Code, err)
		}
	}
	s.Close()

	var run devicesim.PAKERun
	c, err := devicesim.PairCode(ctx, psk, "acme-t1", goodCode, devicesim.PairOptions{Run: &run})
	if err != nil {
		t.Fatalf("pair with the setup code: %v", err)
	}
	if r := g.lastClose(t); r != pairing.ReasonEnrolled {
		t.Errorf("window closed for %q, want enrolled", r)
	}
	dev, err := g.g.Store().Device(c.ID)
	if err != nil || dev.Name != "thermo" || dev.Auth != "cert" || dev.Created.IsZero() {
		t.Errorf("device record = %+v %v, want thermo/cert with a first-seen time", dev, err)
	}
	if es, _ := g.g.Store().ExpectedDevices(); len(es) != 0 {
		t.Errorf("expected devices after enrollment = %v, want none", es)
	}
	if !strings.Contains(c.CAPEM, string(pki.CertPEM(g.g.CA().Root()))) {
		t.Error("/crts inside the enrollment session did not give the gateway's root")
	}
	g.publishBoth(t, c)
	renew(t, g, c)

	// The enrollment session identity is dead once the window closed.
	if _, err := devicesim.DialPSK(ctx, psk, pairing.PSKIdentityPrefix+"acme-t1", make([]byte, 32)); err == nil {
		t.Error("enrollment PSK identity accepted after the window closed")
	}

	// Replay of the earlier session's round 2 in a new window fails the
	// confirmation (fresh shares), and counts as a failed attempt.
	g.expect(t, "thermo2", goodCode)
	g.press(t, 2*time.Second)
	s, err = devicesim.DialPSK(ctx, psk, pairing.PAKEIdentityPrefix+"acme-t1", pairing.PublicPAKEPSK("acme-t1"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r, err := s.Do(ctx, codes.POST, coap.PAKEPath, run.Hello, int(message.AppOctets)); err != nil || r.Code != codes.Changed {
		t.Fatalf("replayed hello = %v %v, want 2.04 (a hello proves nothing)", r.Code, err)
	}
	if r, err := s.Do(ctx, codes.POST, coap.PAKEPath, run.Round2, int(message.AppOctets)); err != nil || r.Code != codes.Forbidden {
		t.Fatalf("replayed round 2 = %v %v, want 4.03", r.Code, err)
	}
	if st := g.g.pairing.win.State(); st.Failures != 1 || !st.Open {
		t.Errorf("after the replay: failures %d open %v, want 1 and still open", st.Failures, st.Open)
	}
	// A 10 s press cancels the window.
	g.press(t, 11*time.Second)
	if r := g.lastClose(t); r != pairing.ReasonCancelled {
		t.Errorf("window closed for %q, want cancelled", r)
	}
}

func TestPairingRefusals(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	psk := g.g.Addrs()["coaps_psk"]
	g.expect(t, "lamp", goodCode)

	t.Run("timeout", func(t *testing.T) {
		g.press(t, 1500*time.Millisecond)
		select {
		case <-g.pclock.Armed():
		case <-time.After(5 * time.Second):
			t.Fatal("the window armed no timeout")
		}
		g.pclock.Advance(pairing.DefaultDuration + time.Second)
		if r := g.lastClose(t); r != pairing.ReasonTimeout {
			t.Fatalf("window closed for %q, want timeout", r)
		}
		if _, err := devicesim.PairCode(ctx, psk, "acme-l1", goodCode, devicesim.PairOptions{}); err == nil {
			t.Fatal("pairing succeeded after the window timed out")
		}
	})

	t.Run("overlap", func(t *testing.T) {
		g.press(t, 1500*time.Millisecond)
		hello := func(id string) (*devicesim.CoAP, devicesim.Response) {
			s, err := devicesim.DialPSK(ctx, psk, pairing.PAKEIdentityPrefix+id, pairing.PublicPAKEPSK(id))
			if err != nil {
				t.Fatalf("%s: %v", id, err)
			}
			m, _ := (pairing.PAKEMessage{Type: pairing.MsgHello, ID: []byte(id)}).MarshalBinary()
			r, err := s.Do(ctx, codes.POST, coap.PAKEPath, m, int(message.AppOctets))
			if err != nil {
				t.Fatal(err)
			}
			return s, r
		}
		a, ra := hello("acme-l1")
		defer a.Close()
		if ra.Code != codes.Changed {
			t.Fatalf("first hello = %v %s", ra.Code, ra.Payload)
		}
		b, rb := hello("intruder-9")
		defer b.Close()
		if rb.Code != codes.Forbidden {
			t.Fatalf("second device's hello = %v, want 4.03", rb.Code)
		}
		if r := g.lastClose(t); r != pairing.ReasonSessionOverlap {
			t.Fatalf("window closed for %q, want session overlap", r)
		}
		al := g.audited(t, string(pairing.StepOverlapAlert))
		if len(al) != 1 || !strings.HasPrefix(al[0].Detail, "ALERT:") {
			t.Errorf("overlap alert audit = %+v, want one ALERT", al)
		}
		// The first device is refused too: its round 2 finds no window.
		if _, err := devicesim.PairCode(ctx, psk, "acme-l1", goodCode, devicesim.PairOptions{}); err == nil {
			t.Error("first device enrolled after the overlap abort")
		}
	})

	t.Run("wrong code ten times", func(t *testing.T) {
		g.press(t, 1500*time.Millisecond)
		for i := 1; i <= pairing.DefaultMaxFailures; i++ {
			if _, err := devicesim.PairCode(ctx, psk, "acme-l1", "WRONG-CODE-0000", devicesim.PairOptions{}); err == nil {
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
	})
	if ds, _ := g.g.Devices().List(); len(ds) != 0 {
		t.Errorf("devices after only refused attempts: %v", ds)
	}
}

// vendorCA makes a vendor root and an IDevID for one device under it.
func vendorCA(t *testing.T, name string) (rootPEM []byte, idevid tls.Certificate) {
	t.Helper()
	rk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rt := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " IDevID root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	rder, err := x509.CreateCertificate(rand.Reader, rt, rt, &rk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rder)
	lk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	lt := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "sensor-x1", SerialNumber: "SN0001"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	lder, err := x509.CreateCertificate(rand.Reader, lt, root, &lk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rder}), tls.Certificate{Certificate: [][]byte{lder}, PrivateKey: lk}
}

func TestPairingIDevID(t *testing.T) {
	acmeRoot, acmeDev := vendorCA(t, "acme")
	_, rogueDev := vendorCA(t, "rogue")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	os.WriteFile(rootFile, acmeRoot, 0o644)
	g := startPairing(t, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addr := g.g.Addrs()["coaps"]
	roots := g.g.CA().RootPool()

	if _, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots); err == nil {
		t.Fatal("IDevID enrolled with no window open")
	}
	g.press(t, 1500*time.Millisecond)
	if _, err := devicesim.PairIDevID(ctx, addr, rogueDev, roots); err == nil {
		t.Fatal("IDevID of an unknown vendor enrolled")
	}
	if n := testutil.ToFloat64(g.g.pairing.refused.WithLabelValues("unknown vendor")); n < 1 {
		t.Errorf("refused{unknown vendor} = %v, want >= 1", n)
	}
	if !g.g.pairing.win.IsOpen() {
		t.Fatal("an unknown vendor's handshake closed the window")
	}
	// A session opened in one window ends with it: it cannot enroll in
	// the next.
	old, err := devicesim.DialIDevID(ctx, addr, acmeDev, roots)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	g.press(t, 11*time.Second) // cancel
	select {
	case <-old.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the IDevID session outlived its window")
	}
	g.pclock.Advance(time.Second)
	g.press(t, 1500*time.Millisecond)
	if _, err := old.EnrollEST(ctx); err == nil {
		t.Fatal("enrollment on a session from the previous window succeeded")
	}
	c, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots)
	if err != nil {
		t.Fatalf("pair with the acme IDevID: %v", err)
	}
	if r := g.lastClose(t); r != pairing.ReasonEnrolled {
		t.Errorf("window closed for %q, want enrolled", r)
	}
	dev, err := g.g.Store().Device(c.ID)
	if err != nil || dev.Vendor != "acme" || dev.Model != "sensor-x1" {
		t.Errorf("device record = %+v %v, want vendor acme, model sensor-x1", dev, err)
	}
	g.publishBoth(t, c)
	// The IDevID alone gives nothing once the window is closed.
	if _, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots); err == nil {
		t.Error("IDevID accepted after the window closed")
	}
	// The console shows the window and the history, and has no way to open it.
	w, _ := consolePairing{g.g.pairing}.Window(ctx)
	if w.Open || !w.Available {
		t.Errorf("console window = %+v, want closed and available", w)
	}
	h, _ := consolePairing{g.g.pairing}.History(ctx, 50)
	if len(h) == 0 || !slices.ContainsFunc(h, func(e console.PairingEvent) bool { return e.Method == "idevid" }) {
		t.Errorf("console history = %+v, want idevid events", h)
	}
}

// renew runs EST /sren with the operational certificate on the certificate
// listener: always available, no window needed.
func renew(t *testing.T, g *pgw, c devicesim.Creds) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	co, err := (&devicesim.Device{Creds: c}).DialCoAP(ctx, g.g.Addrs()["coaps"])
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if r, err := co.Do(ctx, codes.POST, "/.well-known/est/sen", csr, 286); err != nil || r.Code != codes.Forbidden {
		t.Errorf("operational session POST /sen = %v %v, want 4.03", r.Code, err)
	}
	r, err := co.Do(ctx, codes.POST, "/.well-known/est/sren", csr, 286)
	if err != nil || r.Code != codes.Changed {
		t.Fatalf("/sren = %v %s %v, want 2.04", r.Code, r.Payload, err)
	}
	cert, err := x509.ParseCertificate(r.Payload)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := pki.DeviceIDOf(cert); err != nil || id != c.ID {
		t.Errorf("renewed certificate is for %q (%v), want %s", id, err, c.ID)
	}
	if len(g.audited(t, "device.renew")) != 1 {
		t.Error("renewal not audited")
	}
}

func TestPairingKinds(t *testing.T) {
	p := &pairingSvc{}
	for dev, want := range map[string]coap.Kind{
		"dabc234": coap.KindDevice, "pake:acme-1": coap.KindPAKE, "enroll:acme-1": coap.KindEnroll,
		"idevid:acme:00ff": coap.KindEnroll, "other:x": coap.KindNone,
	} {
		if got := p.Kind(dev); got != want {
			t.Errorf("Kind(%q) = %v, want %v", dev, got, want)
		}
	}
}

// A PSK-only device leaves the window with an operational PSK and
// publishes over the CoAPS PSK listener.
func TestPairingSetupCodePSK(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	g.expect(t, "meter", goodCode)
	g.press(t, 1500*time.Millisecond)
	c, err := devicesim.PairCode(ctx, g.g.Addrs()["coaps_psk"], "acme-m1", goodCode, devicesim.PairOptions{PSK: true})
	if err != nil {
		t.Fatalf("pair for a PSK: %v", err)
	}
	if r := g.lastClose(t); r != pairing.ReasonEnrolled {
		t.Errorf("window closed for %q, want enrolled", r)
	}
	dev, err := g.g.Store().Device(c.ID)
	if err != nil || dev.Auth != "psk" || dev.PSKIdentity != c.PSKIdentity || dev.Name != "meter" {
		t.Fatalf("device record = %+v %v, want meter/psk with the issued identity", dev, err)
	}
	co, err := (&devicesim.Device{Creds: c}).DialCoAP(ctx, g.g.Addrs()["coaps_psk"])
	if err != nil {
		t.Fatalf("CoAPS with the enrolled PSK: %v", err)
	}
	defer co.Close()
	if r, err := co.Publish(ctx, "kwh", []byte("3")); err != nil || r.Code != codes.Changed {
		t.Fatalf("publish: %v %v", r.Code, err)
	}
	if ms := g.sink.messages(); len(ms) != 1 || ms[0].Topic != "devices/"+c.ID+"/t/kwh" {
		t.Errorf("sink = %+v, want one message on devices/%s/t/kwh", ms, c.ID)
	}
	// Revocation works as for any device.
	if _, err := g.g.Devices().Revoke(c.ID, Actor{Name: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := (&devicesim.Device{Creds: c}).DialCoAP(ctx, g.g.Addrs()["coaps_psk"]); err == nil {
		t.Error("revoked enrolled PSK still accepted")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: not within 5s", what)
}

// An MQTT-only device with an IDevID enrolls over EST on HTTPS, on a
// listener that exists only while the window is open.
func TestPairingIDevIDHTTPS(t *testing.T) {
	acmeRoot, acmeDev := vendorCA(t, "acme")
	_, rogueDev := vendorCA(t, "rogue")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	os.WriteFile(rootFile, acmeRoot, 0o644)
	// The firewall runs its real planning on in-memory tables: the EST
	// port must be in the policy exactly while the window is open.
	v4 := firewall.NewFake(firewall.IPv4)
	g := startPairingWith(t, func(c *config.Config) {
		c.Pairing.Vendors = map[string]string{"acme": rootFile}
		c.Pairing.ESTListen = "127.0.0.1:0"
	}, func(g *Gateway) {
		fw, err := firewall.New(v4, firewall.NewFake(firewall.IPv6), discard, g.metrics.reg)
		if err != nil {
			t.Fatal(err)
		}
		cfg := g.Config()
		p, _ := cfg.FirewallPolicy()
		if err := fw.Apply(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		g.fw = fw
	})
	estRule := func(port string) bool {
		tb, _ := v4.Snapshot(context.Background())
		for _, rs := range tb.Rules {
			for _, r := range rs {
				if strings.Contains(strings.Join(r.Rule, " "), "--dport "+port) {
					return true
				}
			}
		}
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	roots := g.g.CA().RootPool()
	if a := g.g.pairing.ESTAddr(); a != "" {
		t.Fatalf("EST over HTTPS listens at %s with no window", a)
	}
	g.press(t, 1500*time.Millisecond)
	waitFor(t, "EST over HTTPS opens with the window", func() bool { return g.g.pairing.ESTAddr() != "" })
	addr := g.g.pairing.ESTAddr()
	_, port, _ := net.SplitHostPort(addr)
	// The address is published before the rule is applied (bind, rule,
	// serve), so wait for the rule.
	waitFor(t, "firewall rule for the EST port while the window is open", func() bool { return estRule(port) })
	// A reload during the window keeps the port open.
	if err := g.g.Reload(); err != nil {
		t.Fatal(err)
	}
	if !estRule(port) {
		t.Errorf("a reload during the window took the EST port %s out of the firewall", port)
	}
	url := "https://" + addr
	if _, err := devicesim.PairIDevIDHTTPS(ctx, url, rogueDev, roots); err == nil {
		t.Fatal("unknown vendor enrolled over HTTPS")
	}
	c, err := devicesim.PairIDevIDHTTPS(ctx, url, acmeDev, roots)
	if err != nil {
		t.Fatalf("EST over HTTPS: %v", err)
	}
	if r := g.lastClose(t); r != pairing.ReasonEnrolled {
		t.Errorf("window closed for %q, want enrolled", r)
	}
	waitFor(t, "EST over HTTPS closes with the window", func() bool { return g.g.pairing.ESTAddr() == "" })
	if estRule(port) {
		t.Errorf("firewall rule for the EST port %s left after the window closed", port)
	}
	if conn, err := net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after the window closed", addr)
	}
	dev, err := g.g.Store().Device(c.ID)
	if err != nil || dev.Vendor != "acme" {
		t.Errorf("device record = %+v %v, want vendor acme", dev, err)
	}
	g.publishBoth(t, c)
}

// FuzzDecodeESTBody: RFC 7030 bodies (base64 DER, line breaks allowed),
// seeded with real CSRs as devicesim encodes them and as OpenSSL makes
// them (testdata/est, README there).
func FuzzDecodeESTBody(f *testing.F) {
	files, _ := filepath.Glob("testdata/est/*")
	seeds := 0
	for _, p := range files {
		if strings.HasSuffix(p, ".md") {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		// The base64 captures are accepted CSRs: a seed that is not
		// would seed only the refusal.
		if strings.HasSuffix(p, ".b64") {
			der, err := decodeESTBody(bytes.NewReader(b))
			if err != nil {
				f.Fatalf("%s: %v", p, err)
			}
			if _, err := x509.ParseCertificateRequest(der); err != nil {
				f.Fatalf("%s: not a CSR: %v", p, err)
			}
		}
		f.Add(b)
		seeds++
	}
	if seeds == 0 {
		f.Fatal("no seed CSRs in testdata/est")
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	b64 := base64.StdEncoding.EncodeToString(csr)
	f.Add([]byte(b64))
	var wrapped strings.Builder
	for i := 0; i < len(b64); i += 64 {
		wrapped.WriteString(b64[i:min(i+64, len(b64))] + "\r\n")
	}
	f.Add([]byte(wrapped.String()))
	f.Add([]byte("not base64!"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		der, err := decodeESTBody(bytes.NewReader(b))
		if err != nil {
			return
		}
		if len(b) > maxESTBody || len(der) > maxESTBody {
			t.Fatalf("decoded %d bytes from a %d-byte body over the limit", len(der), len(b))
		}
		again, err := decodeESTBody(strings.NewReader(base64.StdEncoding.EncodeToString(der)))
		if err != nil || !bytes.Equal(again, der) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// A long press of the pairing button with no window open is the physical
// gesture for console password recovery: the box's log (its screen, on the
// appliance) shows a one-time code, which sets a password on the console's
// recovery page once; the audit log says the button asked for it.
func TestLongPressRecoveryCode(t *testing.T) {
	g := startPairing(t, nil)
	g.press(t, 11*time.Second)
	re := regexp.MustCompile(`console recovery code: (\S+) \(valid 15 minutes, once\)`)
	var code string
	for i := 0; code == "" && i < 500; i++ {
		if m := re.FindStringSubmatch(g.log.String()); m != nil {
			code = m[1]
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if code == "" {
		t.Fatal("no recovery code in the log within 5s after a long press")
	}
	if st := g.g.pairing.win.State(); st.Open {
		t.Fatal("a long press opened a window")
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.g.CA().RootPool(), ServerName: "127.0.0.1"}}}
	defer hc.CloseIdleConnections()
	post := func(path string, body map[string]string) int {
		t.Helper()
		b, _ := json.Marshal(body)
		resp, err := hc.Post("https://"+g.g.Addrs()["console"]+path, "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	in := map[string]string{"code": code, "user": "owner", "password": "long enough passphrase 7"}
	if st := post("/api/v1/recover", in); st != http.StatusOK {
		t.Fatalf("recover with the button's code: HTTP %d", st)
	}
	if st := post("/api/v1/session", map[string]string{"user": "owner", "password": in["password"]}); st != http.StatusCreated {
		t.Fatalf("log in with the recovered password: HTTP %d", st)
	}
	if st := post("/api/v1/recover", in); st != http.StatusForbidden {
		t.Errorf("the code worked twice: HTTP %d", st)
	}
	es, err := g.g.Store().AuditLog(100, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(es, func(e store.Event) bool { return e.Action == "console.recovery_code" && e.Actor == "button" }) {
		t.Error("the audit log does not say the button asked for a recovery code")
	}
}

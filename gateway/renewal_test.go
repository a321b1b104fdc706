package gateway

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
)

// pairedDevice pairs one certificate device with the setup code.
func pairedDevice(t *testing.T, g *pgw) devicesim.Creds {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	g.press(t, 1500*time.Millisecond)
	c, err := devicesim.PairCode(ctx, g.g.Addrs()["coaps_psk"], "acme-t1", goodCode, devicesim.PairOptions{})
	if err != nil {
		t.Fatalf("pair with the setup code: %v", err)
	}
	return c
}

// sren asks for a certificate for key over a session made with c; it
// returns the answer's code, and the credentials of the new certificate
// when one came back.
func sren(t *testing.T, g *pgw, c devicesim.Creds, key *ecdsa.PrivateKey) (codes.Code, devicesim.Creds) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	co, err := (&devicesim.Device{Creds: c}).DialCoAP(ctx, g.g.Addrs()["coaps"])
	if err != nil {
		t.Fatalf("handshake for /sren: %v", err)
	}
	defer co.Close()
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	r, err := co.Do(ctx, codes.POST, "/.well-known/est/sren", csr, 286)
	if err != nil {
		t.Fatalf("/sren: %v", err)
	}
	if r.Code != codes.Changed {
		return r.Code, devicesim.Creds{}
	}
	cert, err := x509.ParseCertificate(r.Payload)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	n := c
	n.CertPEM = string(pki.CertPEM(cert))
	n.KeyPEM = string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
	return r.Code, n
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func leafOf(t *testing.T, c devicesim.Creds) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode([]byte(c.CertPEM))
	cert, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// verifyErr is what a handshake with c's certificate meets.
func verifyErr(g *pgw, t *testing.T, c devicesim.Creds) error {
	_, err := g.g.identity().VerifyCert([][]byte{leafOf(t, c).Raw})
	return err
}

// A renewal retires the certificate it replaces: after the grace, or at
// once when the new one is first used; the old one cannot renew again
// (but gets the same answer again for the same key within the grace), and
// the new one cannot renew again within the hour.
func TestRenewalRetiresOldCertificate(t *testing.T) {
	g := startPairing(t, nil)
	clk := g.g.opts.Clock.(*testpki.OffsetClock)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c0 := pairedDevice(t, g)

	k1 := newKey(t)
	code, c1 := sren(t, g, c0, k1)
	if code != codes.Changed {
		t.Fatalf("first /sren = %v, want 2.04", code)
	}
	// Within the grace the old certificate still connects; asking again
	// with the same key gives the same certificate, with another key nothing.
	if err := verifyErr(g, t, c0); err != nil {
		t.Errorf("old certificate within the grace: %v, want accepted", err)
	}
	if code, again := sren(t, g, c0, k1); code != codes.Changed || leafOf(t, again).SerialNumber.Cmp(leafOf(t, c1).SerialNumber) != 0 {
		t.Errorf("/sren again from the old certificate with the same key = %v, want 2.04 with the same certificate", code)
	}
	if code, _ := sren(t, g, c0, newKey(t)); code != codes.Forbidden {
		t.Errorf("second /sren from the old certificate with another key = %v, want 4.03", code)
	}
	// After the grace the old certificate is refused as revoked, the new one works.
	clk.Add(renewGrace + time.Minute)
	if err := verifyErr(g, t, c0); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("old certificate after the grace: %v, want ErrRevoked", err)
	}
	if _, err := (&devicesim.Device{Creds: c0}).DialCoAP(ctx, g.g.Addrs()["coaps"]); err == nil {
		t.Error("handshake with the old certificate after the grace accepted")
	}
	g.waitLog(t, "revoked", c0.ID)
	// A rapid renewal from the new certificate is refused by the rate limit.
	if code, _ := sren(t, g, c1, newKey(t)); code != codes.Code(4<<5|29) {
		t.Errorf("/sren within the hour = %v, want 4.29", code)
	}
	if n := testutil.ToFloat64(g.g.metrics.renewals.WithLabelValues("rate_limited")); n != 1 {
		t.Errorf("renewals{rate_limited} = %v, want 1", n)
	}
	// An hour later it may renew; the first handshake with the newest
	// certificate retires c1 at once, without waiting for the grace.
	clk.Add(renewInterval)
	code, c2 := sren(t, g, c1, newKey(t))
	if code != codes.Changed {
		t.Fatalf("/sren an hour later = %v, want 2.04", code)
	}
	if err := verifyErr(g, t, c1); err != nil {
		t.Errorf("c1 right after its renewal: %v, want accepted (grace)", err)
	}
	co, err := (&devicesim.Device{Creds: c2}).DialCoAP(ctx, g.g.Addrs()["coaps"])
	if err != nil {
		t.Fatalf("handshake with the renewed certificate: %v", err)
	}
	co.Close()
	if err := verifyErr(g, t, c1); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("c1 after c2 was used: %v, want ErrRevoked", err)
	}
	// Retirement is persisted with the old certificates' records.
	certs, _ := g.g.Store().Certs()
	retired := map[string]bool{}
	for _, c := range certs {
		retired[c.Serial] = !c.RetireAt.IsZero()
	}
	if !retired[pki.Serial(leafOf(t, c0))] || !retired[pki.Serial(leafOf(t, c1))] || retired[pki.Serial(leafOf(t, c2))] {
		t.Errorf("certificate records retired = %v, want c0 and c1 only", retired)
	}
}

type failingRenewStore struct{}

func (failingRenewStore) RecordRenewal(old, renewed store.Cert, now time.Time) error {
	return errors.New("disk full")
}

// A renewal that cannot be recorded is answered 5.00 and retires nothing.
func TestRenewalNotRecordedIsAnError(t *testing.T) {
	g := startPairingWith(t, nil, func(g *Gateway) { g.pairing.renew.store = failingRenewStore{} })
	c0 := pairedDevice(t, g)
	if code, _ := sren(t, g, c0, newKey(t)); code != codes.InternalServerError {
		t.Errorf("/sren with a failing store = %v, want 5.00", code)
	}
	if n := testutil.ToFloat64(g.g.metrics.renewals.WithLabelValues("store_failed")); n != 1 {
		t.Errorf("renewals{store_failed} = %v, want 1", n)
	}
	clk := g.g.opts.Clock.(*testpki.OffsetClock)
	clk.Add(renewGrace + time.Minute)
	if err := verifyErr(g, t, c0); err != nil {
		t.Errorf("certificate after a failed renewal: %v, want still accepted", err)
	}
}

// The retirement is persisted: after a restart past the grace the old
// certificate is refused, the new one accepted.
func TestRenewalRetirementSurvivesRestart(t *testing.T) {
	g := startPairing(t, nil)
	c0 := pairedDevice(t, g)
	code, c1 := sren(t, g, c0, newKey(t))
	if code != codes.Changed {
		t.Fatalf("/sren = %v, want 2.04", code)
	}
	g.running.stop(t)
	g.running.done <- nil // for the cleanup's stop
	clk := &testpki.OffsetClock{}
	clk.Set(renewGrace + time.Minute)
	r := runGateway(t, Options{Dev: true, StateDir: g.dir, Log: discard, Out: &bytes.Buffer{}, Clock: clk}, 10*time.Second)
	defer r.stop(t)
	if _, err := r.g.identity().VerifyCert([][]byte{leafOf(t, c0).Raw}); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("old certificate after a restart past the grace: %v, want ErrRevoked", err)
	}
	if _, err := r.g.identity().VerifyCert([][]byte{leafOf(t, c1).Raw}); err != nil {
		t.Errorf("renewed certificate after a restart: %v, want accepted", err)
	}
}

// A /sren over a session whose certificate was retired after the session
// was opened (by the device's renewal: past its grace, or at the new
// certificate's first use) is refused 4.03 and counted retired, with a
// diagnostic telling the device to renew with the certificate it got then,
// or to pair again if it lost it. Before, it was counted revoked and told
// "revoked", which sends a device to re-pair while it holds a good
// certificate. A revoked device's retired certificate is still refused as
// revoked: its newer certificate is revoked with it.
func TestRenewalWithRetiredCertificateCountedRetired(t *testing.T) {
	g := startPairing(t, nil)
	clk := g.g.opts.Clock.(*testpki.OffsetClock)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c0 := pairedDevice(t, g)
	if code, _ := sren(t, g, c0, newKey(t)); code != codes.Changed {
		t.Fatalf("first /sren = %v, want 2.04", code)
	}
	clk.Add(renewGrace + time.Minute)
	// The request as the CoAP bridge hands over one that came on a session
	// opened with c0 before it was retired: over the wire, the certificate
	// sweep closes that session within 5 s, so the request would reach
	// renewal or not depending on when the sweep ran.
	srenOn := func(c devicesim.Creds) est.Response {
		t.Helper()
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, newKey(t))
		if err != nil {
			t.Fatal(err)
		}
		return g.g.pairing.EST(ctx, c.ID, coap.KindDevice, []*x509.Certificate{leafOf(t, c)},
			est.Request{Method: "POST", Path: est.PathSren, ContentFormat: est.FormatPKCS10, Accept: est.NoFormat, Payload: csr})
	}
	result := func(r string) float64 { return testutil.ToFloat64(g.g.metrics.renewals.WithLabelValues(r)) }

	resp := srenOn(c0)
	if resp.Code != est.Forbidden || resp.Issued != nil {
		t.Fatalf("/sren with the retired certificate = %v (issued %v), want 4.03", resp.Code, resp.Issued != nil)
	}
	if !errors.Is(resp.Err, pki.ErrCertRetired) || errors.Is(resp.Err, pki.ErrRevoked) {
		t.Errorf("refusal error %v, want pki.ErrCertRetired, not pki.ErrRevoked", resp.Err)
	}
	for _, want := range []string{pki.Serial(leafOf(t, c0)), "newer certificate issued at its last renewal", "pair again"} {
		if !strings.Contains(string(resp.Payload), want) {
			t.Errorf("diagnostic %q does not say %q", resp.Payload, want)
		}
	}
	if got, revoked := result("retired"), result("revoked"); got != 1 || revoked != 0 {
		t.Errorf("renewals{retired} = %v, {revoked} = %v, want 1 and 0", got, revoked)
	}

	g.g.ca.Revocations().RevokeDevice(c0.ID)
	resp = srenOn(c0)
	if resp.Code != est.Forbidden || !errors.Is(resp.Err, pki.ErrRevoked) || errors.Is(resp.Err, pki.ErrCertRetired) {
		t.Errorf("/sren with the retired certificate of a revoked device = %v, %v; want 4.03, pki.ErrRevoked", resp.Code, resp.Err)
	}
	if got, revoked := result("retired"), result("revoked"); got != 1 || revoked != 1 {
		t.Errorf("after the revocation renewals{retired} = %v, {revoked} = %v, want 1 and 1", got, revoked)
	}
}

// certSerials is the serials of the certificate records in st.
func certSerials(t *testing.T, st *store.Store) map[string]bool {
	t.Helper()
	cs, err := st.Certs()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, c := range cs {
		out[c.Serial] = true
	}
	return out
}

// The records of renewed certificates are deleted once those have
// expired, at the next renewal and at start; a renewed certificate still
// valid keeps its record and stays refused. They used to be kept for
// ever: a device renewing every hour left 8,760 records a year, which
// every revocation and every certificate view of the console read.
func TestRenewalPrunesExpiredRenewedRecords(t *testing.T) {
	g := startPairing(t, func(c *config.Config) { c.PKI.DeviceCertValidity = config.Duration(2 * time.Hour) })
	clk := g.g.opts.Clock.(*testpki.OffsetClock)
	c0 := pairedDevice(t, g)
	code, c1 := sren(t, g, c0, newKey(t))
	if code != codes.Changed {
		t.Fatalf("first /sren = %v, want 2.04", code)
	}
	clk.Add(renewInterval + time.Minute)
	code, c2 := sren(t, g, c1, newKey(t))
	if code != codes.Changed {
		t.Fatalf("second /sren = %v, want 2.04", code)
	}
	// c0 and c1 have expired (2 h each, issued an hour ago and more); c2
	// has an hour left.
	clk.Add(time.Hour)
	s0, s1, s2 := pki.Serial(leafOf(t, c0)), pki.Serial(leafOf(t, c1)), pki.Serial(leafOf(t, c2))
	if got := certSerials(t, g.g.Store()); !got[s0] || !got[s1] || !got[s2] {
		t.Fatalf("records before the third renewal %v, want c0, c1 and c2", got)
	}
	code, c3 := sren(t, g, c2, newKey(t))
	if code != codes.Changed {
		t.Fatalf("third /sren = %v, want 2.04", code)
	}
	s3 := pki.Serial(leafOf(t, c3))
	if got := certSerials(t, g.g.Store()); got[s0] || got[s1] || !got[s2] || !got[s3] {
		t.Errorf("records after the third renewal %v, want c2 and c3 only", got)
	}
	clk.Add(renewGrace + time.Minute)
	if err := verifyErr(g, t, c2); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("c2 after its grace: %v, want refused", err)
	}

	// At start, once c2 has expired too.
	g.running.stop(t)
	g.running.done <- nil // for the cleanup's stop
	restarted := &testpki.OffsetClock{}
	restarted.Set(3*time.Hour + renewInterval + renewGrace)
	r := runGateway(t, Options{Dev: true, StateDir: g.dir, Log: discard, Out: &bytes.Buffer{}, Clock: restarted}, 10*time.Second)
	defer r.stop(t)
	if got := certSerials(t, r.g.Store()); len(got) != 1 || !got[s3] {
		t.Errorf("records after a restart past c2's end %v, want c3 only", got)
	}
}

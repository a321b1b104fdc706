package pki

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
	bad bool
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Sane() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.bad {
		return ErrClockNotSet
	}
	return nil
}
func (c *fakeClock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func newCA(t *testing.T) (*CA, *fakeClock, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	clk := &fakeClock{now: time.Now()}
	ca, err := Open(dir, "test", clk, discard)
	if err != nil {
		t.Fatal(err)
	}
	return ca, clk, dir
}

func csrPEM(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: "i-want-to-be-admin"},
		DNSNames: []string{"evil.example"},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func TestCreateAndReuse(t *testing.T) {
	ca, clk, dir := newCA(t)
	for _, f := range []string{"root.key", "ca.key", "psk.key"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v err %v; want 0600", f, fi.Mode().Perm(), err)
		}
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("pki dir mode %v, want 0700", fi.Mode().Perm())
	}
	if _, err := ca.Issuer().Verify(x509.VerifyOptions{Roots: ca.RootPool()}); err != nil {
		t.Fatalf("issuing CA does not chain to root: %v", err)
	}
	ca2, err := Open(dir, "test", clk, discard)
	if err != nil {
		t.Fatal(err)
	}
	if !ca2.Root().Equal(ca.Root()) || !ca2.Issuer().Equal(ca.Issuer()) {
		t.Error("second Open created a new CA instead of reusing it")
	}
	if string(ca2.PSK("x")) != string(ca.PSK("x")) {
		t.Error("PSK derivation changed across restarts")
	}
	os.Chmod(filepath.Join(dir, "ca.key"), 0o644)
	if _, err := Open(dir, "test", clk, discard); err == nil {
		t.Error("Open accepted a world-readable CA key")
	}
}

func TestClockNotSet(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	clk := &fakeClock{now: time.Unix(0, 0), bad: true}
	if _, err := Open(dir, "test", clk, discard); !errors.Is(err, ErrClockNotSet) {
		t.Fatalf("creating a CA with an unset clock: got %v, want ErrClockNotSet", err)
	}
	ca, clk2, _ := newCA(t)
	clk2.bad = true
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := ParseCSR(csrPEM(t, key))
	if _, err := ca.IssueDevice(csr, "dev1", time.Hour); !errors.Is(err, ErrClockNotSet) {
		t.Errorf("issue with unset clock: %v", err)
	}
	if _, _, err := ca.VerifyDevice([][]byte{ca.Issuer().Raw}); !errors.Is(err, ErrClockNotSet) {
		t.Errorf("verify with unset clock: %v", err)
	}
	if (SystemClock{NotBefore: time.Now().Add(time.Hour)}).Sane() == nil {
		t.Error("SystemClock before its floor reported sane")
	}
	if err := (SystemClock{NotBefore: time.Now().Add(-time.Hour)}).Sane(); err != nil {
		t.Errorf("SystemClock after its floor: %v", err)
	}
}

func TestDeviceCertificate(t *testing.T) {
	ca, clk, _ := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := ParseCSR(csrPEM(t, key))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.IssueDevice(csr, "dev1", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "urn:bastion:device:dev1" {
		t.Errorf("URI SANs = %v, want [urn:bastion:device:dev1]", cert.URIs)
	}
	if len(cert.DNSNames) != 0 || cert.Subject.CommonName != "dev1" {
		t.Errorf("names from the CSR leaked into the certificate: %v %q", cert.DNSNames, cert.Subject.CommonName)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: ca.RootPool(), Intermediates: pool(ca.Issuer()), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("device cert does not chain: %v", err)
	}
	id, _, err := ca.VerifyDevice([][]byte{cert.Raw})
	if err != nil || id != "dev1" {
		t.Fatalf("VerifyDevice = %q, %v", id, err)
	}

	// Revocation of the serial, then of the device, takes effect at once.
	ca.Revocations().RevokeSerial(Serial(cert))
	if _, _, err := ca.VerifyDevice([][]byte{cert.Raw}); !errors.Is(err, ErrRevoked) {
		t.Errorf("revoked serial accepted: %v", err)
	}
	cert2, _ := ca.IssueDevice(csr, "dev1", 24*time.Hour)
	if _, _, err := ca.VerifyDevice([][]byte{cert2.Raw}); err != nil {
		t.Errorf("fresh cert refused: %v", err)
	}
	var notified []string
	ca.Revocations().Subscribe(func(d string) { notified = append(notified, d) })
	ca.Revocations().RevokeDevice("dev1")
	if _, _, err := ca.VerifyDevice([][]byte{cert2.Raw}); !errors.Is(err, ErrRevoked) {
		t.Errorf("cert of revoked device accepted: %v", err)
	}
	if len(notified) != 1 || notified[0] != "dev1" {
		t.Errorf("revocation subscribers told %v", notified)
	}

	// Expired.
	cert3, _ := ca.IssueDevice(csr, "dev2", time.Hour)
	clk.Add(2 * time.Hour)
	if _, _, err := ca.VerifyDevice([][]byte{cert3.Raw}); err == nil {
		t.Error("expired certificate accepted")
	}
}

// CertValid judges what a transport kept of a session's certificate by
// the CA's clock and the revocation set: valid until a retirement time
// comes (not before), its serial or device is revoked, or the clock passes
// NotAfter, each with its own error.
func TestCertValid(t *testing.T) {
	ca, clk, _ := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := ParseCSR(csrPEM(t, key))
	if err != nil {
		t.Fatal(err)
	}
	issue := func(dev string) (string, time.Time) {
		t.Helper()
		c, err := ca.IssueDevice(csr, dev, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return Serial(c), c.NotAfter
	}
	revs := ca.Revocations()
	check := func(what, dev, serial string, notAfter time.Time, want error) {
		t.Helper()
		err := ca.CertValid(dev, serial, notAfter)
		if want == nil && err != nil || want != nil && !errors.Is(err, want) {
			t.Errorf("%s: CertValid = %v, want %v", what, err, want)
		}
	}
	s1, na1 := issue("dev1")
	check("fresh", "dev1", s1, na1, nil)
	revs.RetireSerial(s1, clk.Now().Add(time.Minute))
	check("retired from a minute on", "dev1", s1, na1, nil)
	clk.Add(time.Minute)
	check("retired now", "dev1", s1, na1, ErrCertRetired)

	s2, na2 := issue("dev2")
	revs.RevokeSerial(s2)
	check("serial revoked", "dev2", s2, na2, ErrRevoked)

	s3, na3 := issue("dev3")
	revs.RevokeDevice("dev3")
	check("device revoked", "dev3", s3, na3, ErrRevoked)

	s4, na4 := issue("dev4")
	clk.Add(na4.Sub(clk.Now()))
	check("at NotAfter", "dev4", s4, na4, nil)
	clk.Add(time.Nanosecond)
	check("past NotAfter", "dev4", s4, na4, ErrCertExpired)
}

// A certificate retired by a renewal is refused at verification once its
// retirement time has come, with an error that says so (ErrCertRetired,
// for the refusal's count) and is still a revocation's (ErrRevoked, which
// callers branch on); a revoked one's is not ErrCertRetired.
func TestVerifyDeviceRetired(t *testing.T) {
	ca, clk, _ := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := ParseCSR(csrPEM(t, key))
	c1, err := ca.IssueDevice(csr, "dev1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ca.Revocations().RetireSerial(Serial(c1), clk.Now().Add(time.Minute))
	if _, _, err := ca.VerifyDevice([][]byte{c1.Raw}); err != nil {
		t.Fatalf("before its retirement time: %v", err)
	}
	clk.Add(time.Minute)
	_, _, err = ca.VerifyDevice([][]byte{c1.Raw})
	if !errors.Is(err, ErrCertRetired) || !errors.Is(err, ErrRevoked) {
		t.Errorf("retired: %v, want ErrCertRetired and ErrRevoked", err)
	}
	ca.Revocations().RevokeSerial(Serial(c1))
	if _, _, err := ca.VerifyDevice([][]byte{c1.Raw}); !errors.Is(err, ErrRevoked) || errors.Is(err, ErrCertRetired) {
		t.Errorf("retired, then revoked: %v, want ErrRevoked only", err)
	}
}

func TestVerifyDeviceRefusals(t *testing.T) {
	ca, _, _ := newCA(t)
	other, _, _ := newCA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := ParseCSR(csrPEM(t, key))
	foreign, _ := other.IssueDevice(csr, "dev1", time.Hour)
	if _, _, err := ca.VerifyDevice([][]byte{foreign.Raw}); err == nil {
		t.Error("certificate from another CA accepted")
	}
	sc, _ := ca.ServerCert("mqtt", []string{"localhost"}, time.Hour*24, time.Hour)
	if _, _, err := ca.VerifyDevice([][]byte{sc.Leaf().Raw}); err == nil {
		t.Error("a server certificate was accepted as a device certificate")
	}
	if _, _, err := ca.VerifyDevice(nil); err == nil {
		t.Error("no certificate accepted")
	}
	if _, _, err := ca.VerifyDevice([][]byte{[]byte("junk")}); err == nil {
		t.Error("junk accepted")
	}
}

func TestParseCSR(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	good := csrPEM(t, p256)
	tampered := []byte(string(good))
	blk, _ := pem.Decode(tampered)
	blk.Bytes[len(blk.Bytes)/2] ^= 1
	tests := map[string]struct {
		in []byte
		ok bool
	}{
		"p256 pem": {good, true},
		"p256 der": {mustDER(good), true},
		"p224":     {csrPEM(t, p224), false},
		"ed25519":  {csrPEM(t, ed), false},
		"tampered": {pem.EncodeToMemory(blk), false},
		"garbage":  {[]byte("hello"), false},
	}
	for name, tc := range tests {
		_, err := ParseCSR(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok=%v", name, err, tc.ok)
		}
	}
}

func FuzzParseCSR(f *testing.F) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, k)
	f.Add(der)
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		csr, err := ParseCSR(b)
		if err == nil && csr.CheckSignature() != nil {
			t.Fatal("accepted a CSR whose signature does not verify")
		}
	})
}

func mustDER(p []byte) []byte { b, _ := pem.Decode(p); return b.Bytes }

func pool(cs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range cs {
		p.AddCert(c)
	}
	return p
}

func TestPSK(t *testing.T) {
	ca, _, _ := newCA(t)
	id1, id2 := NewPSKIdentity(), NewPSKIdentity()
	if id1 == id2 {
		t.Fatal("PSK identities repeat")
	}
	k1 := ca.PSK(id1)
	if len(k1) != 32 || strings.Trim(string(k1), "0123456789abcdef") != "" || string(k1) == string(ca.PSK(id2)) {
		t.Errorf("PSK: %d bits, distinct=%v", len(k1)*8, string(k1) != string(ca.PSK(id2)))
	}
	other, _, _ := newCA(t)
	if string(other.PSK(id1)) == string(k1) {
		t.Error("two CAs derive the same PSK")
	}
}

// A live TLS server keeps serving across a renewal, and the next handshake
// sees the new certificate with the right SANs.
func TestServerCertRenewalLive(t *testing.T) {
	ca, clk, _ := newCA(t)
	sc, err := ca.ServerCert("console", []string{"localhost", "127.0.0.1", "::1"}, 48*time.Hour, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", TLSServer(sc, tls.NoClientCert, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	defer wg.Wait()
	defer ln.Close()
	serial := func() string {
		t.Helper()
		c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.RootPool(), ServerName: "127.0.0.1", Time: clk.Now})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer c.Close()
		st := c.ConnectionState()
		if st.Version < tls.VersionTLS12 {
			t.Errorf("negotiated %x", st.Version)
		}
		return Serial(st.PeerCertificates[0])
	}
	first := serial()
	if _, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.RootPool(), ServerName: "evil.example"}); err == nil {
		t.Error("certificate valid for a name it should not cover")
	}
	if _, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.RootPool(), ServerName: "127.0.0.1", MaxVersion: tls.VersionTLS11}); err == nil {
		t.Error("TLS 1.1 accepted")
	}
	if issued, err := sc.Refresh([]string{"::1", "127.0.0.1", "localhost"}); err != nil || issued {
		t.Fatalf("Refresh of a fresh certificate with its names: issued %v, %v; want nothing done", issued, err)
	}
	if serial() != first {
		t.Fatal("a fresh certificate with the same names was re-issued")
	}
	clk.Add(25 * time.Hour) // now inside the renew window
	if issued, err := sc.Refresh([]string{"localhost", "127.0.0.1", "::1"}); err != nil || !issued {
		t.Fatalf("Refresh of a certificate due: issued %v, %v; want it renewed", issued, err)
	}
	if serial() == first {
		t.Fatal("the listener serves the certificate renewal replaced")
	}
	// A restart loads the renewed certificate rather than issuing another.
	sc2, _ := ca.ServerCert("console", []string{"::1", "localhost", "127.0.0.1"}, 48*time.Hour, 24*time.Hour)
	if Serial(sc2.Leaf()) != Serial(sc.Leaf()) {
		t.Error("reload issued a new certificate though the current one is fresh")
	}
	sc3, _ := ca.ServerCert("console", []string{"localhost", "box.lan"}, 48*time.Hour, 24*time.Hour)
	if Serial(sc3.Leaf()) == Serial(sc.Leaf()) {
		t.Error("changed SANs did not re-issue the certificate")
	}
}

// The DTLS logger tells pion whether it traces as pion's own factory would
// decide it (PION_LOG_TRACE=all or naming the dtls scope), so pion skips
// building Tracef arguments only when no trace line would be written.
func TestDTLSLogsTraceEnabled(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want bool
	}{{"", false}, {"all", true}, {"dtls", true}, {"ice,dtls", true}, {"ice", false}} {
		t.Setenv("PION_LOG_TRACE", tc.env)
		l, ok := newSharedDTLSLogs().NewLogger("dtls").(interface{ TraceEnabled() bool })
		if !ok {
			t.Fatal("the DTLS logger does not implement TraceEnabled")
		}
		if got := l.TraceEnabled(); got != tc.want {
			t.Errorf("PION_LOG_TRACE=%q: TraceEnabled %v, want %v", tc.env, got, tc.want)
		}
	}
}

// PSK reuses its keyed HMAC: the same identity gives the same key every
// time, interleaved with others and from several goroutines, and it is
// HMAC-SHA256(psk.key, "bastion psk v1\x00" || identity), hex, truncated.
func TestPSKPooledHMAC(t *testing.T) {
	ca, _, _ := newCA(t)
	want := func(id string) string {
		m := hmac.New(sha256.New, ca.pskKey)
		m.Write([]byte("bastion psk v1\x00" + id))
		return hex.EncodeToString(m.Sum(nil)[:PSKEntropy])
	}
	ids := []string{NewPSKIdentity(), NewPSKIdentity(), "", "x"}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				for _, id := range ids {
					if got := string(ca.PSK(id)); got != want(id) {
						t.Errorf("PSK(%q) = %s, want %s", id, got, want(id))
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}

// A clock that jumped forward, past a server certificate's renewal window,
// has the renewal issue a certificate valid only from the jumped time.
// Once the clock is put right that certificate is due (at the next pass)
// and not fresh (at a restart), though its renewal window is weeks away:
// devices would refuse it until then. A clock stepped back by less than
// the five minutes a certificate is valid before its issue leaves it.
func TestServerCertIssuedWhileClockAhead(t *testing.T) {
	ca, clk, _ := newCA(t)
	sans := []string{"localhost", "127.0.0.1"}
	const validity, renew = 48 * time.Hour, 24 * time.Hour
	sc, err := ca.ServerCert("mqtt", sans, validity, renew)
	if err != nil {
		t.Fatal(err)
	}
	validNow := func(leaf *x509.Certificate) error {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: ca.RootPool(), Intermediates: pool(ca.Issuer()), DNSName: "localhost", CurrentTime: clk.Now()})
		return err
	}

	const jump = 30 * 24 * time.Hour
	clk.Add(jump)
	if issued, err := sc.Refresh(sans); err != nil || !issued {
		t.Fatalf("Refresh with the clock %v ahead: issued %v, %v; want the certificate renewed", jump, issued, err)
	}
	ahead := sc.Leaf()
	clk.Add(-jump)
	if validNow(ahead) == nil {
		t.Fatal("test setup: the certificate issued while the clock was ahead verifies after the correction")
	}

	sc2, err := ca.ServerCert("mqtt", sans, validity, renew)
	if err != nil {
		t.Fatal(err)
	}
	if Serial(sc2.Leaf()) == Serial(ahead) {
		t.Error("a restart kept the certificate that is not valid yet")
	}
	if err := validNow(sc2.Leaf()); err != nil {
		t.Errorf("the certificate a restart issued: %v", err)
	}

	if !sc.Due() {
		t.Error("Due: false for a certificate that is not valid yet")
	}
	if issued, err := sc.Refresh(sans); err != nil || !issued {
		t.Fatalf("Refresh after the clock was put right: issued %v, %v; want the certificate re-issued", issued, err)
	}
	if err := validNow(sc.Leaf()); err != nil {
		t.Errorf("the certificate Refresh issued: %v", err)
	}

	fresh := Serial(sc.Leaf())
	clk.Add(-4 * time.Minute)
	if sc.Due() {
		t.Error("Due: true after the clock stepped back 4 minutes, within the certificate's validity")
	}
	if issued, err := sc.Refresh(sans); err != nil || issued || Serial(sc.Leaf()) != fresh {
		t.Errorf("Refresh after the clock stepped back 4 minutes: issued %v, %v; want nothing done", issued, err)
	}
}

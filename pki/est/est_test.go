package est

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/internal/testenv"
)

// testCA is a real two-level CA built with crypto/x509, standing in for
// the lead's pki.CA behind the same Issuer interface.
type testCA struct {
	root, issuing *x509.Certificate
	key           *ecdsa.PrivateKey
	fail          error
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	rootT := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootT, rootT, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	issT := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "test issuing"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	issDER, err := x509.CreateCertificate(rand.Reader, issT, root, &key.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	iss, _ := x509.ParseCertificate(issDER)
	return &testCA{root: root, issuing: iss, key: key}
}

func (c *testCA) Chain() []*x509.Certificate { return []*x509.Certificate{c.issuing, c.root} }

func (c *testCA) IssueDevice(_ context.Context, csr *x509.CertificateRequest, deviceID string) (*x509.Certificate, error) {
	if c.fail != nil {
		return nil, c.fail
	}
	// Build from the CSR as a careless CA would (copying its names): the
	// handler must have stripped them already.
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: csr.Subject,
		DNSNames: csr.DNSNames, IPAddresses: csr.IPAddresses, ExtraExtensions: csr.Extensions,
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.issuing, csr.PublicKey, c.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func goCSR(t testing.TB, tmpl *x509.CertificateRequest) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, k)
	if err != nil {
		t.Fatal(err)
	}
	return der, k
}

func sen(payload []byte, device string) Request {
	return Request{Method: "POST", Path: PathSen, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: payload, DeviceID: device}
}

func TestCrts(t *testing.T) {
	ca := newTestCA(t)
	h := Handler{Issuer: ca}
	r := h.Handle(context.Background(), Request{Method: "GET", Path: PathCrts, ContentFormat: NoFormat, Accept: NoFormat})
	if r.Code != Content || r.ContentFormat != FormatCertsOnly || r.Err != nil {
		t.Fatalf("crts: %v %d %v", r.Code, r.ContentFormat, r.Err)
	}
	got, err := ParseCertsOnly(r.Payload)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !got[0].Equal(ca.issuing) || !got[1].Equal(ca.root) {
		t.Fatalf("chain: %v", got)
	}
	r = h.Handle(context.Background(), Request{Method: "GET", Path: PathCrts, ContentFormat: NoFormat, Accept: FormatPKIXCert})
	if r.Code != Content || r.ContentFormat != FormatPKIXCert || !bytes.Equal(r.Payload, ca.root.Raw) {
		t.Fatalf("crts as pkix-cert: %v %d", r.Code, r.ContentFormat)
	}
	for name, tc := range map[string]struct {
		req  Request
		want Code
	}{
		"POST":        {Request{Method: "POST", Path: PathCrts, Accept: NoFormat}, MethodNotAllowed},
		"accept cbor": {Request{Method: "GET", Path: PathCrts, Accept: 60}, NotAcceptable},
		"unknown":     {Request{Method: "GET", Path: "/.well-known/est/skg", Accept: NoFormat}, NotFound},
	} {
		if r := h.Handle(context.Background(), tc.req); r.Code != tc.want || r.Err == nil || len(r.Payload) == 0 {
			t.Errorf("%s: got %v (%v), want %v", name, r.Code, r.Err, tc.want)
		}
	}
	if r := (Handler{Issuer: &emptyCA{}}).Handle(context.Background(), Request{Method: "GET", Path: PathCrts, Accept: NoFormat}); r.Code != ServiceUnavailable {
		t.Errorf("empty chain: %v", r.Code)
	}
}

type emptyCA struct{ testCA }

func (*emptyCA) Chain() []*x509.Certificate { return nil }

// TestCertsOnlyWithOpenSSL checks the PKCS#7 encoding both ways against
// OpenSSL: OpenSSL reads what we write, and we read what OpenSSL writes.
func TestCertsOnlyWithOpenSSL(t *testing.T) {
	openssl := testenv.RequireCommand(t, "openssl")
	ca := newTestCA(t)
	der, err := EncodeCertsOnly(ca.Chain())
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "chain.p7b")
	os.WriteFile(p, der, 0o600)
	out, err := exec.Command(openssl, "pkcs7", "-inform", "DER", "-in", p, "-print_certs").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl pkcs7: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "subject=CN = test issuing") || !strings.Contains(string(out), "subject=CN = test root") {
		t.Fatalf("openssl did not find both certificates:\n%s", out)
	}
	var blocks int
	for rest := out; ; blocks++ {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if want := ca.Chain()[blocks].Raw; !bytes.Equal(b.Bytes, want) {
			t.Fatalf("certificate %d differs after openssl round trip", blocks)
		}
	}
	if blocks != 2 {
		t.Fatalf("openssl printed %d certificates", blocks)
	}

	certs, err := ParseCertsOnly(readTestdata(t, "openssl-certs-only-2.p7b.der"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range certs {
		names = append(names, c.Subject.CommonName)
	}
	if diff := cmp.Diff([]string{"openssl test root", "openssl test second"}, names); diff != "" {
		t.Fatalf("openssl certs-only (-want +got):\n%s", diff)
	}
}

func TestParseCertsOnlyRefusals(t *testing.T) {
	ca := newTestCA(t)
	good, _ := EncodeCertsOnly(ca.Chain())
	for name, b := range map[string][]byte{
		"empty":      nil,
		"truncated":  good[:len(good)-1],
		"trailing":   append(append([]byte(nil), good...), 0),
		"a cert":     ca.root.Raw,
		"no certs":   mustCertsOnlyRaw(t, nil),
		"bad cert":   mustCertsOnlyRaw(t, [][]byte{{0x30, 0x03, 0x02, 0x01, 0x01}}),
		"csr inside": mustCertsOnlyRaw(t, [][]byte{readTestdata(t, "openssl-p256-cn-lamp-1.csr.der")}),
	} {
		if _, err := ParseCertsOnly(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := EncodeCertsOnly(nil); err == nil {
		t.Error("encoded an empty chain")
	}
}

// mustCertsOnlyRaw wraps arbitrary elements as the certificate set.
func mustCertsOnlyRaw(t testing.TB, elems [][]byte) []byte {
	t.Helper()
	var certs []*x509.Certificate
	for _, e := range elems {
		certs = append(certs, &x509.Certificate{Raw: e})
	}
	if len(certs) == 0 {
		certs = []*x509.Certificate{{Raw: nil}}
	}
	b, err := EncodeCertsOnly(certs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSenWithOpenSSLCSRs(t *testing.T) {
	ca := newTestCA(t)
	h := Handler{Issuer: ca}
	cases := map[string]struct {
		file    string
		want    Code
		ignored []string
	}{
		"plain P-256":      {"openssl-p256-cn-lamp-1.csr.der", Changed, nil},
		"SAN and CA asked": {"openssl-p256-san-ca.csr.der", Changed, []string{"DNS:bank.example", "IP:10.0.0.1", "extension:2.5.29.17", "extension:2.5.29.19"}},
		"P-384":            {"openssl-p384.csr.der", BadRequest, nil},
		"RSA":              {"openssl-rsa2048.csr.der", BadRequest, nil},
		"SHA-384":          {"openssl-p256-sha384.csr.der", BadRequest, nil},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			csrDER := readTestdata(t, tc.file)
			r := h.Handle(context.Background(), sen(csrDER, "lamp-1"))
			if r.Code != tc.want {
				t.Fatalf("code %v (%v), want %v", r.Code, r.Err, tc.want)
			}
			if tc.want != Changed {
				if !errors.Is(r.Err, ErrBadCSR) {
					t.Fatalf("refusal %v does not wrap ErrBadCSR", r.Err)
				}
				return
			}
			if diff := cmp.Diff(tc.ignored, r.Ignored); diff != "" {
				t.Errorf("ignored (-want +got):\n%s", diff)
			}
			cert, err := x509.ParseCertificate(r.Payload)
			if err != nil || r.ContentFormat != FormatPKIXCert {
				t.Fatalf("payload format %d: %v", r.ContentFormat, err)
			}
			csr, _ := x509.ParseCertificateRequest(csrDER)
			if cert.Subject.CommonName != "lamp-1" || len(cert.DNSNames) != 0 || len(cert.IPAddresses) != 0 || cert.IsCA || cert.BasicConstraintsValid {
				t.Fatalf("issued cert trusts the CSR: CN %q DNS %v IP %v CA %v", cert.Subject.CommonName, cert.DNSNames, cert.IPAddresses, cert.IsCA)
			}
			if !cert.PublicKey.(*ecdsa.PublicKey).Equal(csr.PublicKey) {
				t.Fatal("issued cert has another key")
			}
			if _, err := cert.Verify(x509.VerifyOptions{Roots: poolOf(ca.root), Intermediates: poolOf(ca.issuing),
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Fatalf("issued cert does not chain: %v", err)
			}
		})
	}
}

func poolOf(c *x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c)
	return p
}

func TestSenRefusals(t *testing.T) {
	ca := newTestCA(t)
	h := Handler{Issuer: ca}
	good, _ := goCSR(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "lamp-1"}})
	badSig := append([]byte(nil), good...)
	badSig[len(badSig)-3] ^= 0x01
	cases := map[string]struct {
		req  Request
		want Code
	}{
		"GET":             {Request{Method: "GET", Path: PathSen, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: good, DeviceID: "lamp-1"}, MethodNotAllowed},
		"no format":       {Request{Method: "POST", Path: PathSen, ContentFormat: NoFormat, Accept: NoFormat, Payload: good, DeviceID: "lamp-1"}, UnsupportedFormat},
		"accept cbor":     {Request{Method: "POST", Path: PathSen, ContentFormat: FormatPKCS10, Accept: 60, Payload: good, DeviceID: "lamp-1"}, NotAcceptable},
		"no device":       {sen(good, ""), Unauthorized},
		"too large":       {sen(make([]byte, MaxCSRSize+1), "lamp-1"), EntityTooLarge},
		"empty":           {sen(nil, "lamp-1"), BadRequest},
		"garbage":         {sen([]byte("-----BEGIN CERTIFICATE REQUEST-----"), "lamp-1"), BadRequest},
		"bad signature":   {sen(badSig, "lamp-1"), BadRequest},
		"trailing data":   {sen(append(append([]byte(nil), good...), 0), "lamp-1"), BadRequest},
		"other CN":        {sen(good, "lamp-2"), BadRequest},
		"sren no peer":    {Request{Method: "POST", Path: PathSren, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: good}, Unauthorized},
		"certificate DER": {sen(ca.root.Raw, "lamp-1"), BadRequest},
	}
	for name, tc := range cases {
		r := h.Handle(context.Background(), tc.req)
		if r.Code != tc.want || r.Err == nil || r.Issued != nil {
			t.Errorf("%s: got %v (%v), want %v", name, r.Code, r.Err, tc.want)
		}
	}
	if r := h.Handle(context.Background(), sen(badSig, "lamp-1")); !strings.Contains(r.Err.Error(), "proof of possession") {
		t.Errorf("bad signature reason: %v", r.Err)
	}
	ca.fail = errors.New("disk full")
	if r := h.Handle(context.Background(), sen(good, "lamp-1")); r.Code != InternalServerError || !strings.Contains(r.Err.Error(), "disk full") {
		t.Errorf("issuer failure: %v %v", r.Code, r.Err)
	}
}

func TestSenEmptyCNAndCertsOnlyAnswer(t *testing.T) {
	ca := newTestCA(t)
	h := Handler{Issuer: ca}
	csr, _ := goCSR(t, &x509.CertificateRequest{})
	req := sen(csr, "plug-3")
	req.Accept = FormatCertsOnly
	r := h.Handle(context.Background(), req)
	if r.Code != Changed || r.ContentFormat != FormatCertsOnly {
		t.Fatalf("%v %d %v", r.Code, r.ContentFormat, r.Err)
	}
	certs, err := ParseCertsOnly(r.Payload)
	if err != nil || len(certs) != 1 || certs[0].Subject.CommonName != "plug-3" {
		t.Fatalf("certs-only answer: %v %v", certs, err)
	}
}

func TestSren(t *testing.T) {
	ca := newTestCA(t)
	h := Handler{Issuer: ca}
	csr, _ := goCSR(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "lamp-1"}})
	first := h.Handle(context.Background(), sen(csr, "lamp-1"))
	if first.Code != Changed {
		t.Fatal(first.Err)
	}
	newCSR, _ := goCSR(t, &x509.CertificateRequest{})
	r := h.Handle(context.Background(), Request{Method: "POST", Path: PathSren, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: newCSR, Peer: first.Issued})
	if r.Code != Changed || r.Issued.Subject.CommonName != "lamp-1" {
		t.Fatalf("sren: %v %v", r.Code, r.Err)
	}
	r = h.Handle(context.Background(), Request{Method: "POST", Path: PathSren, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: newCSR, Peer: first.Issued, DeviceID: "lamp-2"})
	if r.Code != Forbidden {
		t.Fatalf("sren with another session identity: %v", r.Code)
	}
}

// With a clock, /sren refuses a presenting certificate that expired while
// its session lasted.
func TestSrenExpiredPeer(t *testing.T) {
	ca := newTestCA(t)
	csr, _ := goCSR(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "lamp-1"}})
	first := Handler{Issuer: ca}.Handle(context.Background(), sen(csr, "lamp-1"))
	if first.Code != Changed {
		t.Fatal(first.Err)
	}
	later := func() time.Time { return first.Issued.NotAfter.Add(time.Second) }
	newCSR, _ := goCSR(t, &x509.CertificateRequest{})
	r := Handler{Issuer: ca, Now: later}.Handle(context.Background(), Request{Method: "POST", Path: PathSren, ContentFormat: FormatPKCS10, Accept: NoFormat, Payload: newCSR, Peer: first.Issued})
	if r.Code != Forbidden || r.Issued != nil {
		t.Errorf("sren with an expired certificate = %v %v, want 4.03", r.Code, r.Err)
	}
}

func TestCodeString(t *testing.T) {
	if Changed.String() != "2.04" || UnsupportedFormat.String() != "4.15" || InternalServerError.String() != "5.00" {
		t.Fatal(Changed.String(), UnsupportedFormat.String(), InternalServerError.String())
	}
}

func seedCSRs(f *testing.F) {
	entries, err := os.ReadDir("testdata")
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".der") {
			f.Add(readTestdata(f, e.Name()))
		}
	}
}

// FuzzParseCSR: no input panics; an accepted CSR is P-256, self-signed
// correctly, and comes back naming only the device.
func FuzzParseCSR(f *testing.F) {
	seedCSRs(f)
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, _, err := ParseCSR(der, "lamp-1")
		if err != nil {
			if !errors.Is(err, ErrBadCSR) {
				t.Fatalf("refusal not wrapping ErrBadCSR: %v", err)
			}
			return
		}
		pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
		if !ok || pub.Curve != elliptic.P256() || csr.Subject.CommonName != "lamp-1" || len(csr.DNSNames)+len(csr.Extensions) != 0 {
			t.Fatalf("accepted CSR breaks the rules: %+v", csr)
		}
	})
}

// FuzzHandle drives every resource with arbitrary payloads and options.
func FuzzHandle(f *testing.F) {
	seedCSRs(f)
	ca := newTestCA(f)
	h := Handler{Issuer: ca}
	f.Fuzz(func(t *testing.T, payload []byte) {
		for _, path := range []string{PathCrts, PathSen, PathSren} {
			for _, accept := range []int{NoFormat, FormatPKIXCert, FormatCertsOnly} {
				r := h.Handle(context.Background(), Request{Method: "POST", Path: path, ContentFormat: FormatPKCS10, Accept: accept, Payload: payload, DeviceID: "lamp-1", Peer: ca.issuing})
				if (r.Err == nil) != (r.Code == Changed || r.Code == Content) {
					t.Fatalf("%s: code %v with err %v", path, r.Code, r.Err)
				}
			}
		}
	})
}

// FuzzParseCertsOnly: no panics on any /crts answer a device could get.
func FuzzParseCertsOnly(f *testing.F) {
	f.Add(readTestdata(f, "openssl-certs-only-2.p7b.der"))
	f.Fuzz(func(t *testing.T, der []byte) {
		certs, err := ParseCertsOnly(der)
		if err == nil && len(certs) == 0 {
			t.Fatal("accepted with no certificates")
		}
	})
}

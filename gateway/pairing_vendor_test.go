package gateway

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// testCert is a certificate and its key, for vendor chains.
type testCert struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// issue makes a certificate named cn, a CA if ca, signed by parent (self
// signed if nil).
func issue(t *testing.T, cn string, ca bool, parent *testCert) *testCert {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	if ca {
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign
	} else {
		tmpl.KeyUsage, tmpl.ExtKeyUsage = x509.KeyUsageDigitalSignature, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	signer := &testCert{cert: tmpl, key: k}
	if parent != nil {
		signer = parent
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer.cert, &k.PublicKey, signer.key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCert{cert: c, key: k}
}

func poolOf(cs ...*testCert) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range cs {
		p.AddCert(c.cert)
	}
	return p
}

// vendorsOf names every vendor a chain reaches, in name order, whatever
// order the map of vendors gives: it used to return the first one the
// map gave, a different one from run to run.
func TestVendorsOfNamesEveryVendorInOrder(t *testing.T) {
	shared, other := issue(t, "shared root", true, nil), issue(t, "other root", true, nil)
	leaf := issue(t, "sensor-x1", false, shared)
	p := &pairingSvc{g: &Gateway{clock: &testpki.OffsetClock{}}}
	roots := map[string]*x509.CertPool{"zeta": poolOf(other)}
	want := []string{"acme", "beta", "delta", "echo", "foxtrot", "globex", "hooli", "initech"}
	for _, n := range want {
		roots[n] = poolOf(shared)
	}
	p.setVendors(roots)
	for i := range 20 { // each pass a new map iteration order
		if d := cmp.Diff(want, p.vendorsOf(leaf.cert, nil)); d != "" {
			t.Fatalf("pass %d: vendors (-want +got):\n%s", i, d)
		}
	}
	if got := p.vendorsOf(issue(t, "stray", false, issue(t, "stray root", true, nil)).cert, nil); len(got) != 0 {
		t.Errorf("vendors of a chain to no configured root: %v, want none", got)
	}
}

// A manufacturer certificate that chains to the roots of several
// configured vendors (a root configured for two, or one vendor's CA under
// another's root) is refused in an open window, saying which and what to
// change: its vendor, which decides the firmware and manifest key the
// device gets, is unknown. It used to be recorded under whichever vendor
// the map gave first. A chain to one vendor enrolls as before.
func TestPairingIDevIDAmbiguousVendorRefused(t *testing.T) {
	root := issue(t, "shared IDevID root", true, nil)
	acmeCA := issue(t, "acme issuing CA", true, root)
	own := issue(t, "initech IDevID root", true, nil)
	dir := t.TempDir()
	write := func(name string, c *testCert) string {
		f := filepath.Join(dir, name+".pem")
		if err := os.WriteFile(f, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw}), 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	vendors := map[string]string{"acme": write("acme", acmeCA), "globex": write("globex", root), "hooli": write("hooli", root), "initech": write("initech", own)}
	g := startPairing(t, func(c *config.Config) { c.Pairing.Vendors = vendors })
	p := g.g.pairing
	g.press(t, 1500*time.Millisecond)

	caErr := errors.New("not ours")
	for _, tc := range []struct {
		name  string
		chain [][]byte
		want  string
	}{
		{"two vendors sharing a root", [][]byte{issue(t, "plug-2", false, root).cert.Raw}, "globex, hooli"},
		{"one vendor's CA under another's root", [][]byte{issue(t, "sensor-x1", false, acmeCA).cert.Raw, acmeCA.cert.Raw}, "acme, globex, hooli"},
	} {
		for range 5 {
			dev, err := p.verifyIDevID(tc.chain, caErr)
			if !errors.Is(err, bridges.ErrPairingRefused) || !strings.Contains(err.Error(), "several vendors in pairing.vendors ("+tc.want+"), so its vendor is unknown") {
				t.Fatalf("%s: %q, %v; want refused naming %s", tc.name, dev, err, tc.want)
			}
		}
	}
	if got := testutil.ToFloat64(p.refused.WithLabelValues("ambiguous vendor")); got != 10 {
		t.Errorf("refused{ambiguous vendor} = %v, want 10", got)
	}
	if es := g.audited(t, "pairing.session_refused"); len(es) == 0 || !strings.Contains(es[0].Detail, "ambiguous vendor: certificate chains to the roots of several vendors") {
		t.Errorf("session refusals audited %v, want the ambiguous vendor", es)
	}
	if !p.win.IsOpen() {
		t.Error("the refusals closed the window")
	}
	dev, err := p.verifyIDevID([][]byte{issue(t, "cam-3", false, own).cert.Raw}, caErr)
	if err != nil || !strings.HasPrefix(dev, idIDevID+"initech:") {
		t.Errorf("a chain to one vendor: %q, %v; want an initech enrollment session", dev, err)
	}
}

// A certificate given to several vendors in pairing.vendors is warned
// about as the roots are loaded (at start and at every reload), naming the
// vendors and the certificate; a certificate given to one vendor, even
// twice, is not. Nothing said so before: the devices under it were
// refused at pairing, as of an unknown vendor, with no word at start.
func TestLoadVendorRootsWarnsOfSharedCertificate(t *testing.T) {
	shared, own, other := issue(t, "shared IDevID root", true, nil), issue(t, "globex IDevID root", true, nil), issue(t, "initech IDevID root", true, nil)
	dir := t.TempDir()
	write := func(name string, cs ...*testCert) string {
		var b []byte
		for _, c := range cs {
			b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw})...)
		}
		f := filepath.Join(dir, name+".pem")
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	files := map[string]string{"acme": write("acme", shared), "globex": write("globex", own, shared), "initech": write("initech", other, other)}
	lb := &logbuf.Buffer{}
	roots, err := loadVendorRoots(files, slog.New(slog.NewTextHandler(lb, nil)))
	if err != nil || len(roots) != 3 {
		t.Fatalf("loaded %d vendors, %v; want 3", len(roots), err)
	}
	var warned []string
	for l := range strings.SplitSeq(lb.String(), "\n") {
		if strings.Contains(l, "level=WARN") {
			warned = append(warned, l)
		}
	}
	if len(warned) != 1 || !strings.Contains(warned[0], `vendors="acme, globex"`) || !strings.Contains(warned[0], "CN=shared IDevID root") {
		t.Errorf("log:\n%s\nwant one warning naming acme and globex and the shared root", lb.String())
	}
}

// A reload that gives an accepted IDevID session's chain to a second
// vendor refuses its enrollment: its vendor, which decides the device's
// firmware and manifest key, is no longer known. The check after a reload
// used to ask only whether the session's vendor still held the chain, and
// enrolled it under that vendor.
func TestIDevIDEnrolmentRefusedWhenAReloadMadeItsVendorAmbiguous(t *testing.T) {
	root := issue(t, "acme IDevID root", true, nil)
	dir := t.TempDir()
	rootFile := filepath.Join(dir, "acme.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.cert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	g := startPairing(t, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} })
	p := g.g.pairing
	g.press(t, 1500*time.Millisecond)
	leaf := issue(t, "sensor-x1", false, root)
	dev, err := p.verifyIDevID([][]byte{leaf.cert.Raw}, errors.New("not ours"))
	if err != nil || !strings.HasPrefix(dev, idIDevID+"acme:") {
		t.Fatalf("IDevID session: %q, %v; want acme's", dev, err)
	}
	// The reload: what gateway.reload puts in force.
	roots, err := loadVendorRoots(map[string]string{"acme": rootFile, "globex": rootFile}, discard)
	if err != nil {
		t.Fatal(err)
	}
	p.setVendors(roots)
	if en, err := p.beginEnrol(dev, []*x509.Certificate{leaf.cert}); err == nil || !strings.Contains(err.Error(), "several vendors") {
		t.Fatalf("enrollment after the reload: %+v, %v; want refused, its vendor unknown", en, err)
	}
	if es := g.audited(t, "pairing.session_refused"); len(es) == 0 || !strings.Contains(es[0].Detail, "ambiguous vendor: manufacturer certificate now chains to the roots of several vendors in pairing.vendors (acme, globex, changed by a reload)") {
		t.Errorf("session refusals audited %+v, want the ambiguous vendor", es)
	}
	if !p.win.IsOpen() || p.win.State().Enrolling != "" {
		t.Errorf("window after the refusal %+v, want open with no attempt", p.win.State())
	}
}

package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ServerCert is a listener's certificate, renewed before expiry or when the
// names it must cover change (Refresh), and swapped live: TLS configs read
// it through GetCertificate, so a renewal reaches the next handshake
// without a restart.
type ServerCert struct {
	ca       *CA
	name     string
	validity time.Duration
	renew    time.Duration
	// mu serialises issuing: a renewal pass and a listener that opens
	// (EST over HTTPS) may both Refresh.
	mu sync.Mutex
	// sans are the names the certificate is issued for (under mu once sc
	// is shared).
	sans []string
	cur  atomic.Pointer[tls.Certificate]
}

// ServerCert loads or issues the certificate for the listener called name
// (e.g. "mqtt") covering sans (DNS names and IP addresses).
func (ca *CA) ServerCert(name string, sans []string, validity, renewBefore time.Duration) (*ServerCert, error) {
	sc := &ServerCert{ca: ca, name: name, sans: slices.Clone(sans), validity: validity, renew: renewBefore}
	c, err := sc.load()
	if err == nil && sc.fresh(c) {
		sc.cur.Store(c)
		return sc, nil
	}
	if err == nil && c.Leaf != nil {
		sc.warnIfIssuedAhead(c.Leaf)
	}
	if err := sc.Renew(); err != nil {
		return nil, err
	}
	return sc, nil
}

func (sc *ServerCert) files() (string, string) {
	return sc.ca.path("server-" + sc.name + ".crt"), sc.ca.path("server-" + sc.name + ".key")
}

func (sc *ServerCert) load() (*tls.Certificate, error) {
	crt, key := sc.files()
	if _, err := readSecret(key); err != nil {
		return nil, err
	}
	c, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// fresh: same names, signed by the current issuer, and not due.
func (sc *ServerCert) fresh(c *tls.Certificate) bool {
	leaf := c.Leaf
	if leaf == nil || !bytes.Equal(leaf.RawIssuer, sc.ca.issuer.RawSubject) || leaf.CheckSignatureFrom(sc.ca.issuer) != nil {
		return false
	}
	if !slices.Equal(leafSANs(leaf), normSANs(sc.sans)) {
		return false
	}
	return !sc.due(leaf)
}

// due reports whether leaf should be replaced now: it is in its renewal
// window, or it is not valid yet. issue makes a certificate valid from
// five minutes before the clock it read, so one that is not valid yet was
// issued while the clock ran ahead (a jump forward, since corrected):
// devices refuse it until the clock reaches its NotBefore, which can be
// weeks, and its renewal window is further still.
func (sc *ServerCert) due(leaf *x509.Certificate) bool {
	now := sc.ca.clock.Now()
	return now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter.Add(-sc.renew))
}

// warnIfIssuedAhead logs a certificate being replaced because it is not
// valid yet (due): the gateway's clock ran ahead, and what else the CA
// issued meanwhile is not valid yet either.
func (sc *ServerCert) warnIfIssuedAhead(leaf *x509.Certificate) {
	if now := sc.ca.clock.Now(); now.Before(leaf.NotBefore) {
		sc.ca.log.Warn("pki: server certificate is not valid until its not_before, so it was issued while the clock ran ahead; re-issuing it. "+
			"Device certificates issued while the clock was ahead are refused until their own not_before: enroll those devices again in a pairing window",
			"listener", sc.name, "serial", Serial(leaf), "not_before", leaf.NotBefore, "now", now)
	}
}

// leafSANs are the DNS names and IP addresses leaf covers, as normSANs
// gives them.
func leafSANs(leaf *x509.Certificate) []string {
	var have []string
	have = append(have, leaf.DNSNames...)
	for _, ip := range leaf.IPAddresses {
		have = append(have, ip.String())
	}
	slices.Sort(have)
	return slices.Compact(have)
}

func normSANs(sans []string) []string {
	var out []string
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			out = append(out, ip.String())
		} else {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Renew issues a new key and certificate now, for the names it has, and
// swaps it in.
func (sc *ServerCert) Renew() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.issue(sc.sans)
}

// Refresh re-issues the certificate if it is due, or if sans (DNS names and
// IP addresses, in any order) are not the names it covers, and reports
// whether it did. The names of a gateway's listeners include the addresses
// of its LAN interfaces, which can come after the start (a box booted
// unplugged, a slow DHCP server) or change (a new lease, a new IPv6
// prefix): until the certificate names the new address, a device that
// verifies the gateway by that address refuses it. On an error the
// certificate served and its names stay as they were.
func (sc *ServerCert) Refresh(sans []string) (issued bool, err error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	have, want := leafSANs(sc.Leaf()), normSANs(sans)
	changed := !slices.Equal(have, want)
	if !changed && !sc.Due() {
		return false, nil
	}
	if changed {
		sc.ca.log.Info("pki: server certificate names changed; re-issuing it", "listener", sc.name, "sans_before", have, "sans", want)
	}
	if err := sc.issue(want); err != nil {
		return false, err
	}
	return true, nil
}

// issue issues a new key and a certificate for sans now, swaps it in and
// makes sans the names sc has. Under mu.
func (sc *ServerCert) issue(sans []string) error {
	if err := sc.ca.clock.Sane(); err != nil {
		return fmt.Errorf("issue %s server certificate: %w", sc.name, err)
	}
	if prev := sc.cur.Load(); prev != nil {
		sc.warnIfIssuedAhead(prev.Leaf)
	}
	if err := sc.ca.checkValidNow(sc.ca.clock.Now()); err != nil {
		// A clock put right while running: the server certificate issued
		// ahead is re-issued, but the chain still fails.
		sc.ca.log.Error("pki: the CA is not valid yet: the server certificate issued now is refused too", "listener", sc.name, "err", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := sc.ca.clock.Now()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "bastion " + sc.name},
		NotBefore:   now.Add(-5 * time.Minute),
		NotAfter:    now.Add(sc.validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, s := range normSANs(sans) {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	leaf, err := signCert(tmpl, sc.ca.issuer, &key.PublicKey, sc.ca.key)
	if err != nil {
		return fmt.Errorf("sign %s server certificate: %w", sc.name, err)
	}
	crt, keyFile := sc.files()
	if err := writeFileAtomic(keyFile, keyPEM(key), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", keyFile, err)
	}
	if err := writeFileAtomic(crt, append(certPEM(leaf), certPEM(sc.ca.issuer)...), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", crt, err)
	}
	sc.cur.Store(&tls.Certificate{
		Certificate: [][]byte{leaf.Raw, sc.ca.issuer.Raw},
		PrivateKey:  key,
		Leaf:        leaf,
	})
	sc.sans = slices.Clone(sans)
	sc.ca.log.Info("pki: issued server certificate", "listener", sc.name, "serial", Serial(leaf), "not_after", leaf.NotAfter, "sans", sc.sans)
	return nil
}

// Leaf returns the certificate being served.
func (sc *ServerCert) Leaf() *x509.Certificate { return sc.cur.Load().Leaf }

// Certificate returns the current certificate, for GetCertificate callbacks.
func (sc *ServerCert) Certificate() *tls.Certificate { return sc.cur.Load() }

// GetCertificate is a crypto/tls callback.
func (sc *ServerCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if err := sc.ca.clock.Sane(); err != nil {
		return nil, err
	}
	return sc.cur.Load(), nil
}

// Due reports whether the certificate should be renewed now: it is in its
// renewal window, or not valid yet (issued while the clock ran ahead).
func (sc *ServerCert) Due() bool { return sc.due(sc.Leaf()) }

package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Signer is what the CA signs with. Keys in files today; a TPM or PKCS#11
// token can implement the same interface tomorrow.
type Signer interface {
	crypto.Signer
}

// CA is the gateway's certificate authority: a root that signs only the
// issuing CA, and an issuing CA that signs server and device certificates.
type CA struct {
	dir     string
	clock   Clock
	log     *slog.Logger
	root    *x509.Certificate
	issuer  *x509.Certificate
	key     Signer // issuing key
	pskKey  []byte
	pskMACs sync.Pool // of hash.Hash: HMAC-SHA256 keyed with pskKey (PSK)
	revoked *Revocations
}

const (
	rootValidity   = 20 * 365 * 24 * time.Hour
	issuerValidity = 10 * 365 * 24 * time.Hour
)

// Open loads the CA in dir, creating it on first start. The directory is
// 0700 and every key file 0600; keys are never logged.
func Open(dir string, gatewayID string, clock Clock, log *slog.Logger) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: create %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	ca := &CA{dir: dir, clock: clock, log: log, revoked: NewRevocations(clock)}
	_, err := os.Stat(filepath.Join(dir, "ca.crt"))
	switch {
	case err == nil:
		if err := ca.load(); err != nil {
			return nil, err
		}
		// An unset clock is waited for (ErrClockNotSet), not blamed on
		// the CA.
		// Logged, not refused: a box without a real-time clock boots with
		// a clock that is sane but behind until NTP sets it, and refusing
		// would leave it with no listeners, queue or console while its
		// uplink is down (PSK devices and the console do not need the
		// CA's dates).
		if clock.Sane() == nil {
			if err := ca.checkValidNow(clock.Now()); err != nil {
				log.Error(err.Error())
			}
		}
		log.Info("pki: loaded CA", "subject", ca.issuer.Subject.CommonName, "not_after", ca.issuer.NotAfter)
	case errors.Is(err, fs.ErrNotExist):
		if err := clock.Sane(); err != nil {
			return nil, fmt.Errorf("pki: cannot create the CA: %w", err)
		}
		if err := ca.create(gatewayID); err != nil {
			return nil, err
		}
		log.Info("pki: created CA", "subject", ca.issuer.Subject.CommonName, "dir", dir)
	default:
		return nil, fmt.Errorf("pki: %w", err)
	}
	return ca, nil
}

func (ca *CA) path(name string) string { return filepath.Join(ca.dir, name) }

// caAheadSlack is how far ahead of the clock the CA's NotBefore may be
// before checkValidNow refuses it: the CA is made valid from an hour before
// its creation, so a clock stepped back a little leaves it valid.
const caAheadSlack = 5 * time.Minute

// checkValidNow returns an error saying what to do if the root or the
// issuing CA is not valid yet at now: every chain to them fails until
// then, and re-issuing server or device certificates cannot help. Either
// the clock is behind, or the CA was created while the clock ran ahead
// (a jump forward, since put right), which only a new CA cures. The CA is
// never recreated here: that means enrolling every device again.
func (ca *CA) checkValidNow(now time.Time) error {
	from := ca.root.NotBefore
	if ca.issuer.NotBefore.After(from) {
		from = ca.issuer.NotBefore
	}
	if !from.After(now.Add(caAheadSlack)) {
		return nil
	}
	return fmt.Errorf("pki: the CA in %s is valid only from %s, %s after the clock (%s), and no device or client accepts a certificate from it until then. "+
		"Either the clock is behind: set it (NTP). Or the CA was created while the clock ran ahead: then wait until %s, or create a new CA: "+
		"stop bastiond, move %s away (mv %s %s.ahead) and start it again, which creates one; every device must then be enrolled again "+
		"(PSK devices too: their keys derive from %s), and every client that trusts %s given the new one",
		ca.dir, from.UTC().Format(time.RFC3339), from.Sub(now).Round(time.Minute), now.UTC().Format(time.RFC3339),
		from.UTC().Format(time.RFC3339), ca.dir, ca.dir, ca.dir, ca.path("psk.key"), ca.path("root.crt"))
}

func (ca *CA) create(gatewayID string) error {
	now := ca.clock.Now()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate root key: %w", err)
	}
	rootTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "Bastion Root CA " + gatewayID, Organization: []string{"Bastion gateway"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(rootValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
	}
	root, err := signCert(rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		return fmt.Errorf("pki: self-sign root: %w", err)
	}
	issKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate issuing key: %w", err)
	}
	issTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "Bastion Issuing CA " + gatewayID, Organization: []string{"Bastion gateway"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(issuerValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	issuer, err := signCert(issTmpl, root, &issKey.PublicKey, rootKey)
	if err != nil {
		return fmt.Errorf("pki: sign issuing CA: %w", err)
	}
	pskKey := make([]byte, 32)
	if _, err := rand.Read(pskKey); err != nil {
		return fmt.Errorf("pki: generate PSK key: %w", err)
	}
	// Keys first, certificates last: ca.crt existing means the CA is complete.
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"root.key", keyPEM(rootKey)},
		{"ca.key", keyPEM(issKey)},
		{"psk.key", pskKey},
		{"root.crt", certPEM(root)},
		{"ca.crt", certPEM(issuer)},
	} {
		if err := writeFileAtomic(ca.path(f.name), f.data, 0o600); err != nil {
			return fmt.Errorf("pki: write %s: %w", f.name, err)
		}
	}
	ca.root, ca.issuer, ca.key, ca.pskKey = root, issuer, issKey, pskKey
	return nil
}

func (ca *CA) load() error {
	var err error
	if ca.root, err = readCert(ca.path("root.crt")); err != nil {
		return err
	}
	if ca.issuer, err = readCert(ca.path("ca.crt")); err != nil {
		return err
	}
	if ca.key, err = readKey(ca.path("ca.key")); err != nil {
		return err
	}
	if ca.pskKey, err = readSecret(ca.path("psk.key")); err != nil {
		return err
	}
	if len(ca.pskKey) != 32 {
		return fmt.Errorf("pki: %s is %d bytes, want 32: the file is damaged; restore it from backup", ca.path("psk.key"), len(ca.pskKey))
	}
	return nil
}

// Root returns the root certificate devices and clients trust.
func (ca *CA) Root() *x509.Certificate { return ca.root }

// Issuer returns the issuing CA certificate.
func (ca *CA) Issuer() *x509.Certificate { return ca.issuer }

// Chain returns issuing CA then root, for clients that want the whole chain.
func (ca *CA) Chain() []*x509.Certificate { return []*x509.Certificate{ca.issuer, ca.root} }

// RootPool is a pool holding only the root.
func (ca *CA) RootPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.root)
	return p
}

// ChainPEM returns the issuing CA and root in PEM, as handed to devices.
func (ca *CA) ChainPEM() []byte { return append(certPEM(ca.issuer), certPEM(ca.root)...) }

// Revocations is the CA's revocation list.
func (ca *CA) Revocations() *Revocations { return ca.revoked }

// Clock returns the clock the CA judges time by.
func (ca *CA) Clock() Clock { return ca.clock }

func signCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// CertPEM encodes a certificate as PEM.
func CertPEM(c *x509.Certificate) []byte { return certPEM(c) }

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func keyPEM(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err) // only fails for unsupported key types
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("pki: %s holds no PEM certificate: restore it from backup", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: parse %s: %w", path, err)
	}
	return c, nil
}

func readSecret(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("pki: %s has mode %v: private keys must be 0600; fix with chmod 600 %s", path, fi.Mode().Perm(), path)
	}
	return os.ReadFile(path)
}

func readKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := readSecret(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("pki: %s holds no PEM key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: parse key %s: %w", path, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("pki: %s is not an ECDSA key", path)
	}
	return ek, nil
}

// writeFileAtomic writes data to path via a synced temporary file and a
// rename, so a crash leaves the old file or the new one.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

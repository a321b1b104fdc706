package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// DeviceURIPrefix is how a device identity is written in a certificate's
// URI SAN: urn:bastion:device:<id>.
const DeviceURIPrefix = "urn:bastion:device:"

var deviceIDRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidDeviceID reports whether id may name a device (it appears in topics
// and URIs, so it is restricted to lowercase letters, digits and '-').
func ValidDeviceID(id string) bool { return deviceIDRe.MatchString(id) }

// NewDeviceID returns a fresh random device id.
func NewDeviceID() string {
	const alphabet = "abcdefghijkmnpqrstuvwxyz23456789" // no 0/o, 1/l
	b := make([]byte, 10)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "d" + string(b)
}

// ParseCSR decodes a PEM or DER certificate signing request and checks what
// the CA requires of it: a valid self-signature and an ECDSA P-256 or P-384
// key (DTLS ECDHE_ECDSA suites need ECDSA). Nothing else in the CSR is
// trusted: names come from the gateway, not the request.
func ParseCSR(b []byte) (*x509.CertificateRequest, error) {
	der := b
	if blk := pemDecode(b, "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"); blk != nil {
		der = blk
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("csr: not a PKCS#10 request (PEM or DER): %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr: signature does not verify (the request was altered or not signed by its key): %w", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("csr: key type %T not accepted: use ECDSA P-256 or P-384", csr.PublicKey)
	}
	if pub.Curve != elliptic.P256() && pub.Curve != elliptic.P384() {
		return nil, fmt.Errorf("csr: curve %s not accepted: use P-256 or P-384", pub.Curve.Params().Name)
	}
	return csr, nil
}

// IssueDevice signs a device certificate for csr with the device identity in
// the URI SAN. The CSR must come from ParseCSR.
func (ca *CA) IssueDevice(csr *x509.CertificateRequest, deviceID string, validity time.Duration) (*x509.Certificate, error) {
	if err := ca.clock.Sane(); err != nil {
		return nil, fmt.Errorf("issue device certificate: %w", err)
	}
	if !ValidDeviceID(deviceID) {
		return nil, fmt.Errorf("issue device certificate: %q is not a valid device id", deviceID)
	}
	u, _ := url.Parse(DeviceURIPrefix + deviceID)
	now := ca.clock.Now()
	notAfter := now.Add(validity)
	if notAfter.After(ca.issuer.NotAfter) {
		notAfter = ca.issuer.NotAfter
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: deviceID},
		URIs:        []*url.URL{u},
		NotBefore:   now.Add(-5 * time.Minute),
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	c, err := signCert(tmpl, ca.issuer, csr.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issue device certificate for %s: %w", deviceID, err)
	}
	ca.log.Info("pki: issued device certificate", "device", deviceID, "serial", Serial(c), "not_after", c.NotAfter)
	return c, nil
}

// Serial is a certificate's serial number in lowercase hex.
func Serial(c *x509.Certificate) string { return hex.EncodeToString(c.SerialNumber.Bytes()) }

// DeviceIDOf returns the device identity in a certificate's URI SAN.
func DeviceIDOf(c *x509.Certificate) (string, error) {
	var ids []string
	for _, u := range c.URIs {
		if s := u.String(); strings.HasPrefix(s, DeviceURIPrefix) {
			ids = append(ids, strings.TrimPrefix(s, DeviceURIPrefix))
		}
	}
	if len(ids) != 1 || !ValidDeviceID(ids[0]) {
		return "", fmt.Errorf("certificate %q carries %d device identities (want exactly one %s<id>)", c.Subject.CommonName, len(ids), DeviceURIPrefix)
	}
	return ids[0], nil
}

// ErrRevoked is returned for a revoked device or certificate.
var ErrRevoked = errors.New("revoked")

// VerifyDevice checks a device's certificate chain as presented in a TLS or
// DTLS handshake: it chains to this CA, is valid now, is for client
// authentication, names exactly one device, and neither the certificate nor
// the device is revoked, nor the certificate renewed past its grace
// (Revocations.RetireSerial). It returns the device id. A revoked
// certificate's error wraps ErrRevoked; a retired one's wraps ErrRevoked
// too (it is refused as a revoked one is) and ErrCertRetired, so that the
// refusal can be told apart (counted as cert_retired, not revoked).
func (ca *CA) VerifyDevice(rawCerts [][]byte) (string, *x509.Certificate, error) {
	if err := ca.clock.Sane(); err != nil {
		return "", nil, err
	}
	if len(rawCerts) == 0 {
		return "", nil, errors.New("device sent no certificate")
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return "", nil, fmt.Errorf("device certificate does not parse: %w", err)
	}
	inter := x509.NewCertPool()
	inter.AddCert(ca.issuer)
	for _, r := range rawCerts[1:] {
		if c, err := x509.ParseCertificate(r); err == nil {
			inter.AddCert(c)
		}
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         ca.RootPool(),
		Intermediates: inter,
		CurrentTime:   ca.clock.Now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return "", nil, fmt.Errorf("device certificate %q not accepted: %w", leaf.Subject.CommonName, err)
	}
	id, err := DeviceIDOf(leaf)
	if err != nil {
		return "", nil, err
	}
	serial := Serial(leaf)
	if ca.revoked.Revoked(id, serial) {
		return id, leaf, fmt.Errorf("device %s certificate %s: %w", id, serial, ErrRevoked)
	}
	if ca.revoked.Retired(serial, ca.clock.Now()) {
		return id, leaf, fmt.Errorf("device %s certificate %s: %w, refused as %w", id, serial, ErrCertRetired, ErrRevoked)
	}
	return id, leaf, nil
}

// ErrCertExpired and ErrCertRetired are (wrapped in) CertValid's errors
// for a certificate past its NotAfter and for one replaced by a renewal
// whose retirement time has come (Revocations.RetireSerial); ErrCertRetired
// also in VerifyDevice's, with ErrRevoked.
var (
	ErrCertExpired = errors.New("certificate expired")
	ErrCertRetired = errors.New("certificate replaced by a renewal (retired)")
)

// CertValid reports whether a device certificate that VerifyDevice
// accepted when a session was established is still good now, by the CA's
// clock, from what the transport kept of it (the device, the leaf's serial
// as Serial gives it, its NotAfter): nil, or an error wrapping ErrRevoked
// (the device or the serial revoked), ErrCertRetired or ErrCertExpired. It
// verifies no chain: one clock read and lookups in the in-memory
// revocation set, so that a transport can ask it for each of its open
// sessions every few seconds. A clock that is not set (Sane) reads before
// any certificate's end and any retirement, so it ends nothing.
func (ca *CA) CertValid(device, serial string, notAfter time.Time) error {
	now := ca.clock.Now()
	switch {
	case ca.revoked.Revoked(device, serial):
		return fmt.Errorf("device %s certificate %s: %w", device, serial, ErrRevoked)
	case ca.revoked.Retired(serial, now):
		return fmt.Errorf("device %s certificate %s: %w", device, serial, ErrCertRetired)
	case now.After(notAfter):
		return fmt.Errorf("device %s certificate %s: %w at %s", device, serial, ErrCertExpired, notAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// PSKEntropy is the strength of device PSKs in bytes: 128 bits, matching
// the AES-128 suites.
const PSKEntropy = 16

// NewPSKIdentity returns a fresh random PSK identity. It travels in clear in
// the DTLS handshake, so it says nothing about the device.
func NewPSKIdentity() string {
	b := make([]byte, 12)
	rand.Read(b)
	return "bpsk1-" + hex.EncodeToString(b)
}

// PSK returns the key for a PSK identity. Keys are derived from the CA's
// PSK key (HMAC-SHA256), so the store never holds a device secret.
//
// The key bytes are 32 lowercase hex characters (128 bits of entropy)
// rather than 16 raw bytes, because common device tooling (libcoap's
// -k, many firmware config files) takes a PSK only as a text string.
func (ca *CA) PSK(identity string) []byte {
	// Every PSK handshake derives its key here: an HMAC keyed once and
	// Reset for the next identity, instead of hmac.New (two SHA-256
	// states and the key schedule) per call. pskKey never changes after
	// Open, so a pooled HMAC is always keyed with it.
	m, ok := ca.pskMACs.Get().(hash.Hash)
	if ok {
		m.Reset()
	} else {
		m = hmac.New(sha256.New, ca.pskKey)
	}
	m.Write([]byte("bastion psk v1\x00"))
	m.Write([]byte(identity))
	var sum [sha256.Size]byte
	key := make([]byte, hex.EncodedLen(PSKEntropy))
	hex.Encode(key, m.Sum(sum[:0])[:PSKEntropy])
	ca.pskMACs.Put(m)
	return key
}

func pemDecode(b []byte, types ...string) []byte {
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return nil
		}
		for _, t := range types {
			if blk.Type == t {
				return blk.Bytes
			}
		}
	}
}

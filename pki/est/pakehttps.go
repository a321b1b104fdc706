package est

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Setup-code enrollment over HTTPS, Bastion's extension next to RFC 7030
// for MQTT-only devices that hold a setup code and no IDevID. Go's TLS has
// no PSK mode, so the SPAKE2+ key cannot key the TLS session as it keys
// the DTLS one; the device cannot check the gateway's TLS certificate
// either (it knows no CA yet). Instead the device runs the two SPAKE2+
// round trips as POSTs to PathPAKE, then sends its CSR to PathPAKEEnroll
// under a MAC, and the gateway answers the certificate and its CA chain
// under another. Both MAC keys come from the PAKE's key (PAKEKeys), and
// both MACs cover the TLS exporter (RFC 5705/8446 7.5, PAKEExporterLabel)
// of the connection the enrollment request travels on, so a man in the
// middle who terminates TLS (the device accepts any certificate) breaks
// them. Nothing here is secret (a CSR, a certificate, CA certificates):
// the MACs authenticate, TLS only hides.

// Paths of the exchange, on the EST listener.
const (
	PathPAKE       = "/.well-known/est/bastion-pake"
	PathPAKEEnroll = "/.well-known/est/bastion-pake-enroll"
)

// PAKEExporterLabel is the TLS exporter label both MACs bind; RFC 5705
// reserves the "EXPERIMENTAL" prefix for labels not registered with IANA.
const PAKEExporterLabel = "EXPERIMENTAL bastion est-pake v1"

// ExporterSize is the length of the exporter value the MACs cover.
const ExporterSize = 32

// MaxSealed bounds a sealed enrollment request or answer.
const MaxSealed = 16 << 10

const (
	sealVersion = 1
	macSize     = sha256.Size
)

// ErrBadSeal wraps every refusal of a sealed message: malformed, or its
// MAC does not verify (tampered, replayed from another exchange, or sent
// on another TLS connection than the one its MAC names).
var ErrBadSeal = errors.New("sealed enrollment message refused")

// PAKEKeys are the two MAC keys of one exchange: one per direction, so a
// message can never be reflected back as the other side's.
type PAKEKeys struct {
	device, gateway []byte
}

// NewPAKEKeys derives the keys from the exchange's key: the enrollment PSK
// (pairing.EnrollmentPSK), which SPAKE2+'s K_shared and the device id
// determine. K_shared is fresh per exchange and covers the SPAKE2+
// transcript (both identities, both shares), so the MACs inherit that
// binding.
func NewPAKEKeys(enrollKey []byte) (PAKEKeys, error) {
	if len(enrollKey) != 32 {
		return PAKEKeys{}, fmt.Errorf("est-pake keys: key of %d bytes, want 32", len(enrollKey))
	}
	d, err := hkdf.Key(sha256.New, enrollKey, nil, "bastion est-pake device MAC v1", 32)
	if err != nil {
		return PAKEKeys{}, fmt.Errorf("est-pake keys: %w", err)
	}
	g, err := hkdf.Key(sha256.New, enrollKey, nil, "bastion est-pake gateway MAC v1", 32)
	if err != nil {
		return PAKEKeys{}, fmt.Errorf("est-pake keys: %w", err)
	}
	return PAKEKeys{device: d, gateway: g}, nil
}

// SealEnroll makes the enrollment request: version, the CSR (u16 length
// and DER), then HMAC-SHA256 under the device's key of the label "enroll",
// the exporter and everything before the MAC.
func (k PAKEKeys) SealEnroll(exporter, csr []byte) ([]byte, error) {
	return seal(k.device, "enroll", exporter, nil, csr)
}

// OpenEnroll checks an enrollment request sealed with SealEnroll on the
// connection whose exporter is given, and returns the CSR.
func (k PAKEKeys) OpenEnroll(exporter, msg []byte) (csr []byte, err error) {
	f, err := open(k.device, "enroll", exporter, nil, msg, 1)
	if err != nil {
		return nil, err
	}
	return f[0], nil
}

// SealIssued makes the answer: version, the certificate (certs-only CMS)
// and the CA chain (certs-only CMS), each with a u16 length, then
// HMAC-SHA256 under the gateway's key of the label "issued", the exporter,
// SHA-256 of the CSR it answers, and everything before the MAC.
func (k PAKEKeys) SealIssued(exporter, csr, cert, cacerts []byte) ([]byte, error) {
	h := sha256.Sum256(csr)
	return seal(k.gateway, "issued", exporter, h[:], cert, cacerts)
}

// OpenIssued checks SealIssued's answer to csr on the connection whose
// exporter is given.
func (k PAKEKeys) OpenIssued(exporter, csr, msg []byte) (cert, cacerts []byte, err error) {
	h := sha256.Sum256(csr)
	f, err := open(k.gateway, "issued", exporter, h[:], msg, 2)
	if err != nil {
		return nil, nil, err
	}
	return f[0], f[1], nil
}

func mac(key []byte, label string, exporter, bound, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("bastion est-pake " + label + "\x00"))
	m.Write(exporter)
	m.Write(bound)
	m.Write(body)
	return m.Sum(nil)
}

func seal(key []byte, label string, exporter, bound []byte, fields ...[]byte) ([]byte, error) {
	if len(key) == 0 {
		return nil, errors.New("est-pake: no keys (NewPAKEKeys)")
	}
	if len(exporter) != ExporterSize {
		return nil, fmt.Errorf("est-pake: exporter of %d bytes, want %d", len(exporter), ExporterSize)
	}
	b := []byte{sealVersion}
	for _, f := range fields {
		if len(f) > 0xffff {
			return nil, fmt.Errorf("est-pake: field of %d bytes, limit 65535", len(f))
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	if len(b)+macSize > MaxSealed {
		return nil, fmt.Errorf("est-pake: sealed message of %d bytes, limit %d", len(b)+macSize, MaxSealed)
	}
	return append(b, mac(key, label, exporter, bound, b)...), nil
}

// open checks the MAC first, in constant time, and only then parses: an
// unauthenticated message is never looked into.
func open(key []byte, label string, exporter, bound, msg []byte, n int) ([][]byte, error) {
	if len(key) == 0 || len(exporter) != ExporterSize {
		return nil, fmt.Errorf("%w: no keys or no exporter", ErrBadSeal)
	}
	if len(msg) > MaxSealed || len(msg) < 1+macSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrBadSeal, len(msg))
	}
	body, tag := msg[:len(msg)-macSize], msg[len(msg)-macSize:]
	if !hmac.Equal(tag, mac(key, label, exporter, bound, body)) {
		return nil, fmt.Errorf("%w: MAC does not verify (another exchange's key, another TLS connection, or altered)", ErrBadSeal)
	}
	if body[0] != sealVersion {
		return nil, fmt.Errorf("%w: version %d", ErrBadSeal, body[0])
	}
	rest := body[1:]
	out := make([][]byte, 0, n)
	for range n {
		if len(rest) < 2 {
			return nil, fmt.Errorf("%w: truncated", ErrBadSeal)
		}
		l := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if len(rest) < l {
			return nil, fmt.Errorf("%w: field of %d bytes with %d left", ErrBadSeal, l, len(rest))
		}
		out = append(out, append([]byte(nil), rest[:l]...))
		rest = rest[l:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrBadSeal, len(rest))
	}
	return out, nil
}

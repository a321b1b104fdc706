// Package est handles Enrollment over Secure Transport requests as EST-coaps
// (RFC 9148) carries them: /crts, /sen and /sren under /.well-known/est,
// with DER payloads and CoAP content formats. It is pure: requests and
// responses are bytes and numbers, so the CoAP/DTLS transport (and an
// RFC 7030 HTTPS front) wrap it without it knowing about sockets.
//
// It never trusts what a CSR asks for beyond its public key: the device
// identity comes from the authenticated session (the pairing window's
// SPAKE2+ or IDevID check for /sen, the current operational certificate for
// /sren), and requested names, extensions and CA flags are dropped before
// the Issuer sees the request. It never signs: an Issuer (the gateway's
// pki.CA) does.
package est

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// CoAP content formats of RFC 9148 section 8.
const (
	FormatCertsOnly = 281 // application/pkcs7-mime; smime-type=certs-only
	FormatCSRAttrs  = 285 // application/csrattrs
	FormatPKCS10    = 286 // application/pkcs10
	FormatPKIXCert  = 287 // application/pkix-cert
	// NoFormat marks an absent Content-Format or Accept option.
	NoFormat = -1
)

// Short resource paths (RFC 9148 section 4.1).
const (
	PathCrts = "/.well-known/est/crts"
	PathSen  = "/.well-known/est/sen"
	PathSren = "/.well-known/est/sren"
)

// MaxCSRSize bounds a CSR payload; a P-256 CSR is about 250 bytes.
const MaxCSRSize = 4096

// Code is a CoAP response code, class<<5 | detail, as go-coap numbers it.
type Code uint16

// The response codes the handler uses.
const (
	Content             Code = 2<<5 | 5  // 2.05
	Changed             Code = 2<<5 | 4  // 2.04
	BadRequest          Code = 4<<5 | 0  // 4.00
	Unauthorized        Code = 4<<5 | 1  // 4.01
	Forbidden           Code = 4<<5 | 3  // 4.03
	NotFound            Code = 4<<5 | 4  // 4.04
	MethodNotAllowed    Code = 4<<5 | 5  // 4.05
	NotAcceptable       Code = 4<<5 | 6  // 4.06
	EntityTooLarge      Code = 4<<5 | 13 // 4.13
	TooManyRequests     Code = 4<<5 | 29 // 4.29 (RFC 8516)
	UnsupportedFormat   Code = 4<<5 | 15 // 4.15
	InternalServerError Code = 5<<5 | 0  // 5.00
	ServiceUnavailable  Code = 5<<5 | 3  // 5.03
)

const methodGET, methodPOST = "GET", "POST"

func (c Code) String() string { return fmt.Sprintf("%d.%02d", c>>5, c&31) }

// Issuer signs device certificates. The gateway's pki.CA implements it.
type Issuer interface {
	// IssueDevice signs an operational certificate for deviceID with the
	// CSR's public key. The CSR it receives carries no requested names or
	// extensions; the certificate's identity is deviceID only.
	IssueDevice(ctx context.Context, csr *x509.CertificateRequest, deviceID string) (*x509.Certificate, error)
	// Chain is the issuing CA first, up to the root.
	Chain() []*x509.Certificate
}

// Request is one EST-coaps request after the transport authenticated it.
type Request struct {
	Method        string // "GET" or "POST"
	Path          string // one of the Path constants
	ContentFormat int    // NoFormat if absent
	Accept        int    // NoFormat if absent
	Payload       []byte
	// DeviceID is the identity the session proved: the setup-code device
	// ID after SPAKE2+, or the IDevID-derived ID. Required for /sen.
	DeviceID string
	// Peer is the operational certificate the device authenticated with
	// (DTLS client certificate). Required for /sren.
	Peer *x509.Certificate
}

// Response is what to send back.
type Response struct {
	Code          Code
	ContentFormat int // NoFormat for diagnostic payloads
	Payload       []byte
	// Issued is the new certificate of a successful /sen or /sren, for
	// the caller's device record and audit.
	Issued *x509.Certificate
	// Err explains a refusal for logs and audit (the Payload carries a
	// short diagnostic for the device).
	Err error
	// Ignored lists what the CSR asked for and did not get.
	Ignored []string
}

// Handler answers EST-coaps requests.
type Handler struct {
	Issuer Issuer
	// Now, when set, is the time against which /sren checks that the
	// presented certificate is still valid (a session may outlive it).
	Now func() time.Time
}

func refuse(code Code, err error) Response {
	return Response{Code: code, ContentFormat: NoFormat, Payload: []byte(err.Error()), Err: err}
}

// Handle answers one request. Enrollment (/sen) must only be routed here
// while a pairing window is open and the device's attempt holds it; the
// caller commits the attempt (pairing.Attempt.Succeed) before sending a
// successful response.
func (h Handler) Handle(ctx context.Context, r Request) Response {
	switch r.Path {
	case PathCrts:
		return h.crts(r)
	case PathSen, PathSren:
		return h.enroll(ctx, r)
	}
	return refuse(NotFound, fmt.Errorf("est: no resource %q (supported: crts, sen, sren)", r.Path))
}

func (h Handler) crts(r Request) Response {
	if r.Method != methodGET {
		return refuse(MethodNotAllowed, fmt.Errorf("est crts: method %s, want GET", r.Method))
	}
	chain := h.Issuer.Chain()
	if len(chain) == 0 {
		return refuse(ServiceUnavailable, errors.New("est crts: the CA has no certificates yet"))
	}
	switch r.Accept {
	case NoFormat, FormatCertsOnly:
		der, err := EncodeCertsOnly(chain)
		if err != nil {
			return refuse(InternalServerError, fmt.Errorf("est crts: %w", err))
		}
		return Response{Code: Content, ContentFormat: FormatCertsOnly, Payload: der}
	case FormatPKIXCert:
		// RFC 9148 4.3: with a single certificate asked for, the trust
		// anchor (the root, last in the chain).
		return Response{Code: Content, ContentFormat: FormatPKIXCert, Payload: chain[len(chain)-1].Raw}
	}
	return refuse(NotAcceptable, fmt.Errorf("est crts: accept %d, want %d or %d", r.Accept, FormatCertsOnly, FormatPKIXCert))
}

func (h Handler) enroll(ctx context.Context, r Request) Response {
	op := "sen"
	if r.Path == PathSren {
		op = "sren"
	}
	if r.Method != methodPOST {
		return refuse(MethodNotAllowed, fmt.Errorf("est %s: method %s, want POST", op, r.Method))
	}
	if r.ContentFormat != FormatPKCS10 {
		return refuse(UnsupportedFormat, fmt.Errorf("est %s: content format %d, want %d (application/pkcs10, DER)", op, r.ContentFormat, FormatPKCS10))
	}
	if r.Accept != NoFormat && r.Accept != FormatPKIXCert && r.Accept != FormatCertsOnly {
		return refuse(NotAcceptable, fmt.Errorf("est %s: accept %d, want %d or %d", op, r.Accept, FormatPKIXCert, FormatCertsOnly))
	}
	device := r.DeviceID
	if r.Path == PathSren {
		if r.Peer == nil {
			return refuse(Unauthorized, errors.New("est sren: renewal needs the current operational certificate as DTLS client certificate"))
		}
		device = r.Peer.Subject.CommonName
		if h.Now != nil {
			if now := h.Now(); now.Before(r.Peer.NotBefore) || now.After(r.Peer.NotAfter) {
				return refuse(Forbidden, fmt.Errorf("est sren %s: certificate valid %s to %s, not now (%s): enroll again in a pairing window",
					device, r.Peer.NotBefore.UTC().Format(time.RFC3339), r.Peer.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339)))
			}
		}
		if r.DeviceID != "" && r.DeviceID != device {
			return refuse(Forbidden, fmt.Errorf("est sren: session identity %q differs from certificate %q", r.DeviceID, device))
		}
	}
	if device == "" {
		return refuse(Unauthorized, fmt.Errorf("est %s: the session proved no device identity", op))
	}
	if len(r.Payload) > MaxCSRSize {
		return refuse(EntityTooLarge, fmt.Errorf("est %s %s: CSR of %d bytes, limit %d", op, device, len(r.Payload), MaxCSRSize))
	}
	csr, ignored, err := ParseCSR(r.Payload, device)
	if err != nil {
		return refuse(BadRequest, fmt.Errorf("est %s %s: %w", op, device, err))
	}
	cert, err := h.Issuer.IssueDevice(ctx, csr, device)
	if err != nil {
		return refuse(InternalServerError, fmt.Errorf("est %s %s: issue certificate: %w", op, device, err))
	}
	resp := Response{Code: Changed, ContentFormat: FormatPKIXCert, Payload: cert.Raw, Issued: cert, Ignored: ignored}
	if r.Accept == FormatCertsOnly {
		der, err := EncodeCertsOnly([]*x509.Certificate{cert})
		if err != nil {
			return refuse(InternalServerError, fmt.Errorf("est %s %s: %w", op, device, err))
		}
		resp.ContentFormat, resp.Payload = FormatCertsOnly, der
	}
	return resp
}

// ErrBadCSR wraps every CSR refusal.
var ErrBadCSR = errors.New("CSR refused")

// ParseCSR parses a DER PKCS#10 request and applies Bastion's rules: a
// valid self-signature, ECDSA with SHA-256, a P-256 key, and a subject
// common name that is empty or equal to deviceID. The returned request
// keeps only the public key, its signature fields and a subject of
// deviceID; ignored lists what it asked for beyond that.
func ParseCSR(der []byte, deviceID string) (*x509.CertificateRequest, []string, error) {
	if len(der) == 0 || len(der) > MaxCSRSize {
		return nil, nil, fmt.Errorf("%w: %d bytes, want 1 to %d", ErrBadCSR, len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: not a DER PKCS#10 request: %w", ErrBadCSR, err)
	}
	if csr.SignatureAlgorithm != x509.ECDSAWithSHA256 {
		return nil, nil, fmt.Errorf("%w: signature algorithm %v, want ECDSA-SHA256", ErrBadCSR, csr.SignatureAlgorithm)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, nil, fmt.Errorf("%w: public key %T, want an ECDSA P-256 key", ErrBadCSR, csr.PublicKey)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, nil, fmt.Errorf("%w: signature does not verify with its own key (proof of possession failed): %w", ErrBadCSR, err)
	}
	if cn := csr.Subject.CommonName; cn != "" && cn != deviceID {
		return nil, nil, fmt.Errorf("%w: subject CN %q is not the enrolled device %q", ErrBadCSR, cn, deviceID)
	}
	var ignored []string
	for _, n := range csr.DNSNames {
		ignored = append(ignored, "DNS:"+n)
	}
	for _, ip := range csr.IPAddresses {
		ignored = append(ignored, "IP:"+ip.String())
	}
	for _, e := range csr.EmailAddresses {
		ignored = append(ignored, "email:"+e)
	}
	for _, u := range csr.URIs {
		ignored = append(ignored, "URI:"+u.String())
	}
	for _, e := range csr.Extensions {
		ignored = append(ignored, "extension:"+e.Id.String())
	}
	clean := &x509.CertificateRequest{
		Raw:                      csr.Raw,
		RawTBSCertificateRequest: csr.RawTBSCertificateRequest,
		RawSubjectPublicKeyInfo:  csr.RawSubjectPublicKeyInfo,
		Signature:                csr.Signature,
		SignatureAlgorithm:       csr.SignatureAlgorithm,
		PublicKeyAlgorithm:       csr.PublicKeyAlgorithm,
		PublicKey:                csr.PublicKey,
		Version:                  csr.Version,
		Subject:                  pkix.Name{CommonName: deviceID},
	}
	return clean, ignored, nil
}

var (
	oidSignedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}
	oidData       = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
)

// EncodeCertsOnly builds a degenerate CMS SignedData carrying certs and no
// signers (RFC 5652; the "certs-only" of RFC 8551), as DER.
func EncodeCertsOnly(certs []*x509.Certificate) ([]byte, error) {
	if len(certs) == 0 {
		return nil, errors.New("certs-only: no certificates")
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // ContentInfo
		b.AddASN1ObjectIdentifier(oidSignedData)
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { // SignedData
				b.AddASN1Int64(1)
				b.AddASN1(cbasn1.SET, func(*cryptobyte.Builder) {}) // digestAlgorithms
				b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
					b.AddASN1ObjectIdentifier(oidData)
				})
				b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
					for _, c := range certs {
						b.AddBytes(c.Raw)
					}
				})
				b.AddASN1(cbasn1.SET, func(*cryptobyte.Builder) {}) // signerInfos
			})
		})
	})
	return b.Bytes()
}

// ParseCertsOnly reads what EncodeCertsOnly (or any CMS certs-only
// producer) writes and returns the certificates, refusing trailing data
// and signed content. Devices and devicesim use it on /crts answers.
func ParseCertsOnly(der []byte) ([]*x509.Certificate, error) {
	in := cryptobyte.String(der)
	var ci, sd, content cryptobyte.String
	var oid asn1.ObjectIdentifier
	if !in.ReadASN1(&ci, cbasn1.SEQUENCE) || !in.Empty() ||
		!ci.ReadASN1ObjectIdentifier(&oid) || !oid.Equal(oidSignedData) ||
		!ci.ReadASN1(&content, cbasn1.Tag(0).Constructed().ContextSpecific()) || !ci.Empty() ||
		!content.ReadASN1(&sd, cbasn1.SEQUENCE) || !content.Empty() {
		return nil, errors.New("certs-only: not a CMS ContentInfo carrying SignedData")
	}
	var version int64
	var digests, encap, signers, certsField cryptobyte.String
	var eType asn1.ObjectIdentifier
	var hasCerts bool
	if !sd.ReadASN1Integer(&version) || (version != 1 && version != 3) ||
		!sd.ReadASN1(&digests, cbasn1.SET) ||
		!sd.ReadASN1(&encap, cbasn1.SEQUENCE) || !encap.ReadASN1ObjectIdentifier(&eType) || !encap.Empty() ||
		!sd.ReadOptionalASN1(&certsField, &hasCerts, cbasn1.Tag(0).Constructed().ContextSpecific()) {
		return nil, errors.New("certs-only: malformed SignedData (want version 1, no content)")
	}
	if sd.PeekASN1Tag(cbasn1.Tag(1).Constructed().ContextSpecific()) {
		var crls cryptobyte.String
		sd.ReadASN1(&crls, cbasn1.Tag(1).Constructed().ContextSpecific())
	}
	if !sd.ReadASN1(&signers, cbasn1.SET) || !sd.Empty() || !signers.Empty() || !hasCerts {
		return nil, errors.New("certs-only: signers present, certificates missing, or trailing data")
	}
	var out []*x509.Certificate
	for !certsField.Empty() {
		var raw cryptobyte.String
		if !certsField.ReadASN1Element(&raw, cbasn1.SEQUENCE) {
			return nil, errors.New("certs-only: malformed certificate set")
		}
		c, err := x509.ParseCertificate(raw)
		if err != nil {
			return nil, fmt.Errorf("certs-only: certificate %d: %w", len(out), err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("certs-only: no certificates")
	}
	return out, nil
}

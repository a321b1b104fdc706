package otacache

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"
)

// Class is a device class: the vendor and the model a firmware image is
// built for. A device is only ever offered or served images of its own class.
type Class struct {
	Vendor string `json:"vendor"`
	Model  string `json:"model"`
}

func (c Class) String() string { return c.Vendor + "/" + c.Model }

// nameRE bounds vendor and model names: they become URL path segments and
// map keys, so they are kept to a small, unambiguous alphabet.
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// Validate reports whether the class names are usable as path segments.
func (c Class) Validate() error {
	if !nameRE.MatchString(c.Vendor) || strings.Contains(c.Vendor, "..") {
		return fmt.Errorf("device class vendor %q: want 1-63 of [a-z0-9._-], starting with a letter or digit, no \"..\"", c.Vendor)
	}
	if !nameRE.MatchString(c.Model) || strings.Contains(c.Model, "..") {
		return fmt.Errorf("device class model %q: want 1-63 of [a-z0-9._-], starting with a letter or digit, no \"..\"", c.Model)
	}
	return nil
}

// Version is a dotted numeric firmware version ("1.4.2"), compared
// component by component. Pre-release suffixes are refused on purpose: an
// ordering that two parties could read differently is a rollback hole.
type Version []uint64

// ParseVersion parses 1 to 4 dot-separated decimal components.
func ParseVersion(s string) (Version, error) {
	if s == "" || len(s) > 64 {
		return nil, fmt.Errorf("firmware version %q: want 1-4 dot-separated numbers such as 1.4.2", s)
	}
	// Counted and cut in place, not strings.Split: the serving path parses
	// the device's version for every block.
	n := strings.Count(s, ".") + 1
	if n > 4 {
		return nil, fmt.Errorf("firmware version %q: more than 4 components", s)
	}
	v := make(Version, n)
	rest := s
	for i := range n {
		p, after, _ := strings.Cut(rest, ".")
		rest = after
		if p == "" || (len(p) > 1 && p[0] == '0') {
			return nil, fmt.Errorf("firmware version %q: component %d %q is empty or has a leading zero", s, i+1, p)
		}
		c, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("firmware version %q: component %d %q is not a number below 2^32", s, i+1, p)
		}
		v[i] = c
	}
	return v, nil
}

// Compare returns -1, 0 or +1; missing components count as 0 (1.2 == 1.2.0).
func (v Version) Compare(w Version) int {
	for i := 0; i < max(len(v), len(w)); i++ {
		var a, b uint64
		if i < len(v) {
			a = v[i]
		}
		if i < len(w) {
			b = w[i]
		}
		switch {
		case a < b:
			return -1
		case a > b:
			return 1
		}
	}
	return 0
}

// TargetCustom is the "custom" object of a firmware target in the vendor's
// TUF targets metadata. It lives under the "bastion" key so that a vendor
// can keep its own fields beside it:
//
//	"custom": {"bastion": {"vendor": "acme", "model": "th-10", "version": "1.4.2",
//	           "sequence": 42, "manifest": "<base64 COSE_Sign1>"}}
//
// See ota-cache/README.md for the full schema.
type TargetCustom struct {
	Vendor   string `json:"vendor"`
	Model    string `json:"model"`
	Version  string `json:"version"`
	Sequence uint64 `json:"sequence"`
	// Manifest is the vendor's COSE_Sign1 over the image manifest
	// (base64 in JSON). The gateway passes it on untouched, so a device
	// can verify the image without trusting the gateway.
	Manifest []byte `json:"manifest"`
}

// Class returns the device class the target is built for.
func (t TargetCustom) Class() Class { return Class{Vendor: t.Vendor, Model: t.Model} }

// maxCustomBytes bounds the custom metadata of one target; a manifest is a
// few hundred bytes.
const maxCustomBytes = 16 << 10

// ParseTargetCustom decodes and validates the custom metadata of a TUF
// target. Unknown fields inside the "bastion" object are refused; other keys
// beside "bastion" belong to the vendor and are ignored. A target without a
// "bastion" object is not firmware for Bastion and yields ErrNotFirmware.
func ParseTargetCustom(raw []byte) (TargetCustom, error) {
	var tc TargetCustom
	if len(raw) > maxCustomBytes {
		return tc, fmt.Errorf("target custom metadata: %d bytes, more than the %d allowed", len(raw), maxCustomBytes)
	}
	var outer map[string]json.RawMessage
	if err := json.Unmarshal(raw, &outer); err != nil {
		return tc, fmt.Errorf("target custom metadata: not a JSON object: %w", err)
	}
	inner, ok := outer["bastion"]
	if !ok {
		return tc, ErrNotFirmware
	}
	dec := json.NewDecoder(bytes.NewReader(inner))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&tc); err != nil {
		return tc, fmt.Errorf("target custom metadata \"bastion\": %w", err)
	}
	if dec.More() {
		return tc, errors.New("target custom metadata \"bastion\": trailing data")
	}
	if err := tc.Class().Validate(); err != nil {
		return tc, fmt.Errorf("target custom metadata: %w", err)
	}
	if _, err := ParseVersion(tc.Version); err != nil {
		return tc, fmt.Errorf("target custom metadata: %w", err)
	}
	if tc.Sequence == 0 {
		return tc, errors.New("target custom metadata: sequence must be a positive integer that grows with every release of the class")
	}
	if len(tc.Manifest) == 0 {
		return tc, errors.New("target custom metadata: manifest (the vendor's COSE_Sign1, base64) is missing")
	}
	return tc, nil
}

// ErrNotFirmware marks a TUF target that carries no Bastion firmware
// metadata; such targets are skipped, not refused.
var ErrNotFirmware = errors.New("target has no \"bastion\" custom metadata")

// Manifest is the payload the vendor signs with COSE_Sign1. Field names
// follow SUIT (RFC 9124 / draft-ietf-suit-manifest) where one exists; it is
// encoded as a CBOR map with these text keys.
type Manifest struct {
	ManifestVersion uint64 `cbor:"manifest-version" json:"manifestVersion"`
	SequenceNumber  uint64 `cbor:"sequence-number" json:"sequenceNumber"`
	VendorID        string `cbor:"vendor-id" json:"vendorId"`
	ClassID         string `cbor:"class-id" json:"classId"`
	Version         string `cbor:"version" json:"version"`
	ImageSize       int64  `cbor:"image-size" json:"imageSize"`
	// ImageDigest is the SHA-256 of the image (SUIT digest with algorithm
	// -16, kept implicit: only SHA-256 is accepted).
	ImageDigest []byte `cbor:"image-digest" json:"imageDigest"`
}

// ManifestContentType is the COSE content type of a Bastion manifest.
const ManifestContentType = "application/vnd.bastion.fw-manifest+cbor"

var manifestDecMode = func() cbor.DecMode {
	dm, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
		MaxArrayElements:  16,
		MaxMapPairs:       16,
		MaxNestedLevels:   4,
	}.DecMode()
	if err != nil {
		panic(err) // static options; cannot fail at run time
	}
	return dm
}()

func (m Manifest) validate() error {
	if m.ManifestVersion != 1 {
		return fmt.Errorf("manifest-version %d: only 1 is known", m.ManifestVersion)
	}
	if err := (Class{Vendor: m.VendorID, Model: m.ClassID}).Validate(); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if _, err := ParseVersion(m.Version); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if m.SequenceNumber == 0 || m.ImageSize <= 0 || len(m.ImageDigest) != 32 {
		return fmt.Errorf("manifest: sequence-number %d, image-size %d, image-digest of %d bytes: want positive numbers and a 32-byte SHA-256", m.SequenceNumber, m.ImageSize, len(m.ImageDigest))
	}
	return nil
}

// SignManifest is the vendor's side: it encodes m and signs it as a tagged
// COSE_Sign1 with key (ed25519 or ECDSA P-256). Bastion itself never signs
// manifests; the function exists for vendor tooling, tests and devicesim.
func SignManifest(m Manifest, key crypto.Signer) ([]byte, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	alg, err := coseAlg(key.Public())
	if err != nil {
		return nil, err
	}
	signer, err := cose.NewSigner(alg, key)
	if err != nil {
		return nil, fmt.Errorf("manifest signer: %w", err)
	}
	payload, err := cbor.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	headers := cose.Headers{Protected: cose.ProtectedHeader{
		cose.HeaderLabelAlgorithm:   alg,
		cose.HeaderLabelContentType: ManifestContentType,
	}}
	return cose.Sign1(rand.Reader, signer, headers, payload, nil)
}

// VerifyManifest checks the vendor's COSE_Sign1 over a manifest with the
// vendor's public key and returns the manifest it carries.
func VerifyManifest(signed []byte, vendorKey crypto.PublicKey) (Manifest, error) {
	m, msg, err := decodeManifest(signed)
	if err != nil {
		return m, err
	}
	alg, err := coseAlg(vendorKey)
	if err != nil {
		return m, err
	}
	if got, err := msg.Headers.Protected.Algorithm(); err != nil || got != alg {
		return m, fmt.Errorf("manifest: protected algorithm %v does not match the vendor key (%v)", got, alg)
	}
	verifier, err := cose.NewVerifier(alg, vendorKey)
	if err != nil {
		return m, fmt.Errorf("manifest verifier: %w", err)
	}
	if err := msg.Verify(nil, verifier); err != nil {
		return m, fmt.Errorf("manifest: vendor signature does not verify: %w", err)
	}
	return m, nil
}

// decodeManifest parses a COSE_Sign1 manifest without checking its
// signature; used where the key is not known (the gateway may not hold
// every vendor's key) and before verification.
func decodeManifest(signed []byte) (Manifest, *cose.Sign1Message, error) {
	var m Manifest
	if len(signed) > maxCustomBytes {
		return m, nil, fmt.Errorf("manifest: %d bytes, more than the %d allowed", len(signed), maxCustomBytes)
	}
	var msg cose.Sign1Message
	if err := msg.UnmarshalCBOR(signed); err != nil {
		return m, nil, fmt.Errorf("manifest: not a tagged COSE_Sign1: %w", err)
	}
	if ct, ok := msg.Headers.Protected[cose.HeaderLabelContentType]; !ok || ct != ManifestContentType {
		return m, nil, fmt.Errorf("manifest: content type %v, want %q", ct, ManifestContentType)
	}
	if err := manifestDecMode.Unmarshal(msg.Payload, &m); err != nil {
		return m, nil, fmt.Errorf("manifest payload: %w", err)
	}
	if err := m.validate(); err != nil {
		return m, nil, err
	}
	return m, &msg, nil
}

// matches reports whether a manifest describes exactly this target.
func (m Manifest) matches(tc TargetCustom, size int64, sha256 []byte) error {
	switch {
	case m.VendorID != tc.Vendor || m.ClassID != tc.Model:
		return fmt.Errorf("manifest class %s/%s differs from the target's %s", m.VendorID, m.ClassID, tc.Class())
	case m.Version != tc.Version:
		return fmt.Errorf("manifest version %s differs from the target's %s", m.Version, tc.Version)
	case m.SequenceNumber != tc.Sequence:
		return fmt.Errorf("manifest sequence-number %d differs from the target's %d", m.SequenceNumber, tc.Sequence)
	case m.ImageSize != size:
		return fmt.Errorf("manifest image-size %d differs from the target length %d", m.ImageSize, size)
	case !bytes.Equal(m.ImageDigest, sha256):
		return fmt.Errorf("manifest image-digest %s differs from the target sha256 %s", hex.EncodeToString(m.ImageDigest), hex.EncodeToString(sha256))
	}
	return nil
}

func coseAlg(pub crypto.PublicKey) (cose.Algorithm, error) {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return cose.AlgorithmEdDSA, nil
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() {
			return cose.AlgorithmES256, nil
		}
		if k.Curve == elliptic.P384() {
			return cose.AlgorithmES384, nil
		}
	}
	return 0, fmt.Errorf("vendor key of type %T: want ed25519 or ECDSA P-256/P-384", pub)
}

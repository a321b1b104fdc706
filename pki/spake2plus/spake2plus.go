// Package spake2plus implements SPAKE2+ (RFC 9383) for the single
// ciphersuite Bastion uses, P256-SHA256-HKDF-SHA256-HMAC-SHA256: the
// prover (the side that knows the setup code and holds w0 and w1), the
// verifier (the side that holds only w0 and L = w1*P), the transcript, the
// key schedule and key confirmation, and registration of a setup code into
// w0 and w1 through scrypt.
//
// Group arithmetic is filippo.io/nistec (constant time); scalar range
// checks and the reduction of the PBKDF output use filippo.io/bigmod
// (constant time), so no secret scalar goes through math/big.
//
// It owns no sockets and no storage: callers carry the shares and
// confirmations in whatever protocol they run, and store the records.
// It never logs, and never returns a shared key before the peer's
// confirmation has been checked in constant time.
//
// The message order is the RFC's: the prover sends shareP, the verifier
// answers shareV and confirmV together, the prover answers confirmP.
package spake2plus

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"filippo.io/bigmod"
	"filippo.io/nistec"
)

// Sizes of the values on the wire and in records, for P-256 with SHA-256.
const (
	// ShareSize is the length of shareP and shareV: an uncompressed SEC1
	// point.
	ShareSize = 65
	// ConfirmSize is the length of confirmP and confirmV (HMAC-SHA256).
	ConfirmSize = 32
	// SharedKeySize is the length of K_shared.
	SharedKeySize = 32
	// ScalarSize is the length of w0, w1 and the ephemeral scalars.
	ScalarSize = 32
)

// Suite is the RFC 9383 name of the only ciphersuite this package speaks.
const Suite = "P256-SHA256-HKDF-SHA256-HMAC-SHA256"

// Errors a caller may branch on. Every refusal wraps one of them.
var (
	// ErrInvalidShare means a share was not a valid P-256 point in
	// uncompressed form, was the identity, or cancelled the password mask.
	ErrInvalidShare = errors.New("spake2plus: invalid share")
	// ErrConfirmation means the peer's confirmation did not match: the
	// peer used another setup code, another context or other identities,
	// or the messages were altered.
	ErrConfirmation = errors.New("spake2plus: key confirmation failed")
	// ErrInvalidSecret means w0, w1 or L were malformed, zero or out of
	// range.
	ErrInvalidSecret = errors.New("spake2plus: invalid secret")
	// ErrUsed means a session method was called out of order or twice.
	ErrUsed = errors.New("spake2plus: session already finished or used out of order")
)

// The RFC 9383 section 4 constants for P-256. The RFC prints them
// compressed (02886e2f... and 03d8bbd6...); they are kept uncompressed, as
// they enter the transcript, so that using them costs no square root. A
// test checks that they compress to the RFC's values.
const (
	mHex = "04886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f5ff355163e43ce224e0b0e65ff02ac8e5c7be09419c785e0ca547d55a12e2d20"
	nHex = "04d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b4907d60aa6bfade45008a636337f5168c64d9bd36034808cd564490b1e656edbe7"
)

// orderBytes is the order p of the P-256 group (called n in SEC1).
var orderBytes = [ScalarSize]byte{
	0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
}

// orderModulus is p for constant-time arithmetic (filippo.io/bigmod, the
// standalone copy of the standard library's crypto/internal/bigmod).
func orderModulus() *bigmod.Modulus {
	m, err := bigmod.NewModulus(orderBytes[:])
	if err != nil {
		panic("spake2plus: P-256 order refused: " + err.Error())
	}
	return m
}

func mustPoint(h string) *nistec.P256Point {
	b := make([]byte, len(h)/2)
	for i := range b {
		var v byte
		for _, c := range h[2*i : 2*i+2] {
			v <<= 4
			switch {
			case c >= '0' && c <= '9':
				v |= byte(c - '0')
			case c >= 'a' && c <= 'f':
				v |= byte(c - 'a' + 10)
			}
		}
		b[i] = v
	}
	p, err := nistec.NewP256Point().SetBytes(b)
	if err != nil {
		panic("spake2plus: RFC 9383 constant does not decode: " + err.Error())
	}
	return p
}

// pointM and pointN are decoded on each use so that no package state is
// shared between goroutines; decoding an uncompressed point is cheap next
// to the scalar multiplications that follow.
func pointM() *nistec.P256Point { return mustPoint(mHex) }
func pointN() *nistec.P256Point { return mustPoint(nHex) }

// Context is what both sides must agree on besides the setup code: the
// application context string and the two identities. A mismatch in any of
// them makes confirmation fail.
type Context struct {
	// Context is the application's customisation string, e.g.
	// "bastion enrollment v1 " + Suite.
	Context []byte
	// ProverID and VerifierID name the two parties. RFC 9383 asks for them
	// to be non-empty where identities are not implicit.
	ProverID   []byte
	VerifierID []byte
}

// scalar is a P-256 scalar in [1, p-1], big-endian.
type scalar [ScalarSize]byte

func scalarFromBytes(b []byte) (scalar, error) {
	var s scalar
	if len(b) != ScalarSize {
		return s, fmt.Errorf("%w: scalar is %d bytes, want %d", ErrInvalidSecret, len(b), ScalarSize)
	}
	// Both checks run in constant time: the scalar may be a secret.
	n, err := bigmod.NewNat().SetBytes(b, orderModulus())
	if err != nil || n.IsZero() == 1 {
		return s, fmt.Errorf("%w: scalar not in [1, p-1]", ErrInvalidSecret)
	}
	copy(s[:], b)
	return s, nil
}

// reduce returns v mod p as a scalar, in constant time; zero is refused
// because w0 = 0 or w1 = 0 would remove the password from the exchange.
func reduce(v []byte) (scalar, error) {
	var s scalar
	// A modulus of 2^(8*len(v)) + 1 holds any value of len(v) bytes.
	wideBytes := make([]byte, len(v)+1)
	wideBytes[0], wideBytes[len(v)] = 1, 1
	wide, err := bigmod.NewModulus(wideBytes)
	if err != nil {
		return s, fmt.Errorf("%w: %w", ErrInvalidSecret, err)
	}
	x, err := bigmod.NewNat().SetBytes(v, wide)
	if err != nil {
		return s, fmt.Errorf("%w: %w", ErrInvalidSecret, err)
	}
	order := orderModulus()
	r := bigmod.NewNat().Mod(x, order)
	if r.IsZero() == 1 {
		return s, fmt.Errorf("%w: value reduces to zero mod p", ErrInvalidSecret)
	}
	copy(s[:], r.Bytes(order))
	return s, nil
}

// randomScalar draws a uniform scalar in [1, p-1] by rejection sampling;
// a draw is rejected with probability about 2^-32.
func randomScalar(rand io.Reader) (scalar, error) {
	var s scalar
	for range 64 {
		if _, err := io.ReadFull(rand, s[:]); err != nil {
			return s, fmt.Errorf("spake2plus: read randomness: %w", err)
		}
		if _, err := scalarFromBytes(s[:]); err == nil {
			return s, nil
		}
	}
	return s, errors.New("spake2plus: randomness source keeps returning out-of-range scalars")
}

// ProverSecret is (w0, w1): what the side that knows the setup code
// derives from it. It is password-equivalent: store it like a password
// hash and only as long as needed.
type ProverSecret struct {
	w0, w1 scalar
}

// VerifierRecord is (w0, L = w1*P): what the side that never learns the
// setup code stores.
type VerifierRecord struct {
	w0 scalar
	l  [ShareSize]byte
}

// NewProverSecret builds a secret from w0 and w1 given as 32-byte
// big-endian scalars in [1, p-1].
func NewProverSecret(w0, w1 []byte) (*ProverSecret, error) {
	a, err := scalarFromBytes(w0)
	if err != nil {
		return nil, fmt.Errorf("w0: %w", err)
	}
	b, err := scalarFromBytes(w1)
	if err != nil {
		return nil, fmt.Errorf("w1: %w", err)
	}
	return &ProverSecret{w0: a, w1: b}, nil
}

// ProverSecretFromPBKDF splits a PBKDF output into w0s || w1s and reduces
// each half mod p (RFC 9383 section 3.2). Each half must be at least 40
// bytes so that the bias of the reduction is at most 2^-64.
func ProverSecretFromPBKDF(out []byte) (*ProverSecret, error) {
	if len(out)%2 != 0 || len(out) < 2*minHalf {
		return nil, fmt.Errorf("%w: PBKDF output is %d bytes, want an even length of at least %d", ErrInvalidSecret, len(out), 2*minHalf)
	}
	h := len(out) / 2
	w0, err := reduce(out[:h])
	if err != nil {
		return nil, fmt.Errorf("w0: %w", err)
	}
	w1, err := reduce(out[h:])
	if err != nil {
		return nil, fmt.Errorf("w1: %w", err)
	}
	return &ProverSecret{w0: w0, w1: w1}, nil
}

// minHalf is ceil(log2(p))/8 + 64/8 bytes: 40 for P-256.
const minHalf = 40

// W0 returns a copy of w0.
func (s *ProverSecret) W0() []byte { return append([]byte(nil), s.w0[:]...) }

// W1 returns a copy of w1.
func (s *ProverSecret) W1() []byte { return append([]byte(nil), s.w1[:]...) }

// VerifierRecord computes the record the verifier stores: w0 and L = w1*P.
func (s *ProverSecret) VerifierRecord() *VerifierRecord {
	l, err := nistec.NewP256Point().ScalarBaseMult(s.w1[:])
	if err != nil {
		panic("spake2plus: 32-byte scalar refused: " + err.Error())
	}
	r := &VerifierRecord{w0: s.w0}
	copy(r.l[:], l.Bytes())
	return r
}

// MarshalBinary encodes the secret as w0 || w1 (64 bytes).
func (s *ProverSecret) MarshalBinary() ([]byte, error) {
	return append(s.W0(), s.w1[:]...), nil
}

// UnmarshalBinary decodes w0 || w1 as written by MarshalBinary.
func (s *ProverSecret) UnmarshalBinary(b []byte) error {
	if len(b) != 2*ScalarSize {
		return fmt.Errorf("%w: prover secret is %d bytes, want %d", ErrInvalidSecret, len(b), 2*ScalarSize)
	}
	n, err := NewProverSecret(b[:ScalarSize], b[ScalarSize:])
	if err != nil {
		return err
	}
	*s = *n
	return nil
}

// NewVerifierRecord builds a record from w0 (32-byte scalar) and L
// (uncompressed point, not the identity).
func NewVerifierRecord(w0, l []byte) (*VerifierRecord, error) {
	a, err := scalarFromBytes(w0)
	if err != nil {
		return nil, fmt.Errorf("w0: %w", err)
	}
	if _, err := decodeShare(l); err != nil {
		return nil, fmt.Errorf("%w: L: %w", ErrInvalidSecret, err)
	}
	r := &VerifierRecord{w0: a}
	copy(r.l[:], l)
	return r, nil
}

// W0 returns a copy of w0.
func (r *VerifierRecord) W0() []byte { return append([]byte(nil), r.w0[:]...) }

// L returns a copy of L = w1*P, uncompressed.
func (r *VerifierRecord) L() []byte { return append([]byte(nil), r.l[:]...) }

// MarshalBinary encodes the record as w0 || L (97 bytes).
func (r *VerifierRecord) MarshalBinary() ([]byte, error) {
	return append(r.W0(), r.l[:]...), nil
}

// UnmarshalBinary decodes w0 || L as written by MarshalBinary.
func (r *VerifierRecord) UnmarshalBinary(b []byte) error {
	if len(b) != ScalarSize+ShareSize {
		return fmt.Errorf("%w: verifier record is %d bytes, want %d", ErrInvalidSecret, len(b), ScalarSize+ShareSize)
	}
	n, err := NewVerifierRecord(b[:ScalarSize], b[ScalarSize:])
	if err != nil {
		return err
	}
	*r = *n
	return nil
}

// decodeShare accepts only an uncompressed SEC1 point on P-256 that is not
// the identity. P-256 has cofactor 1, so every point on the curve other
// than the identity is in the prime-order group and no cofactor
// multiplication is needed.
func decodeShare(b []byte) (*nistec.P256Point, error) {
	if len(b) != ShareSize || b[0] != 4 {
		return nil, fmt.Errorf("%w: want a %d-byte uncompressed point starting 0x04, got %d bytes", ErrInvalidShare, ShareSize, len(b))
	}
	p, err := nistec.NewP256Point().SetBytes(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidShare, err)
	}
	if p.IsInfinity() == 1 {
		return nil, fmt.Errorf("%w: identity element", ErrInvalidShare)
	}
	return p, nil
}

// ValidateShare reports whether b is acceptable as shareP or shareV on the
// wire, without running the protocol. Sessions check it themselves; this is
// for callers that want to refuse a malformed message early.
func ValidateShare(b []byte) error {
	_, err := decodeShare(b)
	return err
}

func mul(p *nistec.P256Point, s scalar) *nistec.P256Point {
	r, err := nistec.NewP256Point().ScalarMult(p, s[:])
	if err != nil {
		panic("spake2plus: 32-byte scalar refused: " + err.Error())
	}
	return r
}

func baseMul(s scalar) *nistec.P256Point {
	r, err := nistec.NewP256Point().ScalarBaseMult(s[:])
	if err != nil {
		panic("spake2plus: 32-byte scalar refused: " + err.Error())
	}
	return r
}

// unmask returns share - w0*base, refusing the identity: a share equal to
// w0*base would make Z the identity whatever the ephemeral scalar.
func unmask(share *nistec.P256Point, w0 scalar, base *nistec.P256Point) (*nistec.P256Point, error) {
	m := mul(base, w0)
	r := nistec.NewP256Point().Add(share, m.Negate(m))
	if r.IsInfinity() == 1 {
		return nil, fmt.Errorf("%w: share cancels the password mask", ErrInvalidShare)
	}
	return r, nil
}

// transcript builds TT (RFC 9383 section 3.3).
func transcript(c Context, shareP, shareV, z, v []byte, w0 scalar) []byte {
	var tt []byte
	for _, f := range [][]byte{c.Context, c.ProverID, c.VerifierID,
		pointM().Bytes(), pointN().Bytes(), shareP, shareV, z, v, w0[:]} {
		tt = binary.LittleEndian.AppendUint64(tt, uint64(len(f)))
		tt = append(tt, f...)
	}
	return tt
}

// keys is the key schedule of RFC 9383 section 3.4.
type keys struct {
	main, confirmP, confirmV, shared []byte
}

func schedule(tt []byte) keys {
	sum := sha256.Sum256(tt)
	ck, err := hkdf.Key(sha256.New, sum[:], nil, "ConfirmationKeys", 2*sha256.Size)
	if err != nil {
		panic("spake2plus: hkdf: " + err.Error())
	}
	sk, err := hkdf.Key(sha256.New, sum[:], nil, "SharedKey", SharedKeySize)
	if err != nil {
		panic("spake2plus: hkdf: " + err.Error())
	}
	return keys{main: sum[:], confirmP: ck[:sha256.Size], confirmV: ck[sha256.Size:], shared: sk}
}

func mac(key, msg []byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(msg)
	return h.Sum(nil)
}

// Prover is one run of the prover's side. It is single-use and not safe
// for concurrent use.
type Prover struct {
	ctx    Context
	secret ProverSecret
	x      scalar
	shareP []byte
	done   bool
}

// NewProver starts a run: it draws x from rand (crypto/rand.Reader in
// production) and returns the session and shareP to send.
func NewProver(c Context, s *ProverSecret, rand io.Reader) (*Prover, []byte, error) {
	x, err := randomScalar(rand)
	if err != nil {
		return nil, nil, fmt.Errorf("spake2plus prover start: %w", err)
	}
	return newProverWithScalar(c, s, x)
}

func newProverWithScalar(c Context, s *ProverSecret, x scalar) (*Prover, []byte, error) {
	X := nistec.NewP256Point().Add(baseMul(x), mul(pointM(), s.w0))
	p := &Prover{ctx: c, secret: *s, x: x, shareP: X.Bytes()}
	return p, append([]byte(nil), p.shareP...), nil
}

// SetContext replaces the context before Finish. shareP does not depend on
// the context, which enters only the transcript, so a prover that learns
// the verifier's identity in the verifier's answer may send shareP first.
func (p *Prover) SetContext(c Context) { p.ctx = c }

// Finish takes the verifier's shareV and confirmV. If confirmV checks, it
// returns confirmP to send back and K_shared; otherwise it returns an error
// wrapping ErrInvalidShare or ErrConfirmation and no key. A Prover finishes
// once, whatever the outcome.
func (p *Prover) Finish(shareV, confirmV []byte) (confirmP, sharedKey []byte, err error) {
	if p.done {
		return nil, nil, ErrUsed
	}
	p.done = true
	defer clear(p.x[:])
	Y, err := decodeShare(shareV)
	if err != nil {
		return nil, nil, fmt.Errorf("spake2plus prover: shareV: %w", err)
	}
	base, err := unmask(Y, p.secret.w0, pointN())
	if err != nil {
		return nil, nil, fmt.Errorf("spake2plus prover: shareV: %w", err)
	}
	z := mul(base, p.x).Bytes()
	v := mul(base, p.secret.w1).Bytes()
	k := schedule(transcript(p.ctx, p.shareP, shareV, z, v, p.secret.w0))
	if subtle.ConstantTimeCompare(mac(k.confirmV, p.shareP), confirmV) != 1 {
		return nil, nil, fmt.Errorf("spake2plus prover: confirmV: %w", ErrConfirmation)
	}
	return mac(k.confirmP, shareV), k.shared, nil
}

// Verifier is one run of the verifier's side. It is single-use and not
// safe for concurrent use.
type Verifier struct {
	confirmP []byte
	shared   []byte
	done     bool
}

// NewVerifier answers a prover's shareP: it draws y from rand and returns
// the session, shareV and confirmV to send. The shared key is released by
// Finish only once the prover's confirmation checks.
func NewVerifier(c Context, r *VerifierRecord, shareP []byte, rand io.Reader) (*Verifier, []byte, []byte, error) {
	y, err := randomScalar(rand)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("spake2plus verifier start: %w", err)
	}
	return newVerifierWithScalar(c, r, shareP, y)
}

func newVerifierWithScalar(c Context, r *VerifierRecord, shareP []byte, y scalar) (*Verifier, []byte, []byte, error) {
	X, err := decodeShare(shareP)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("spake2plus verifier: shareP: %w", err)
	}
	base, err := unmask(X, r.w0, pointM())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("spake2plus verifier: shareP: %w", err)
	}
	L, err := decodeShare(r.l[:])
	if err != nil {
		return nil, nil, nil, fmt.Errorf("spake2plus verifier: record L: %w", err)
	}
	shareV := nistec.NewP256Point().Add(baseMul(y), mul(pointN(), r.w0)).Bytes()
	z := mul(base, y).Bytes()
	v := mul(L, y).Bytes()
	k := schedule(transcript(c, shareP, shareV, z, v, r.w0))
	vs := &Verifier{confirmP: mac(k.confirmP, shareV), shared: k.shared}
	return vs, shareV, mac(k.confirmV, shareP), nil
}

// Finish checks the prover's confirmP in constant time and returns
// K_shared. A Verifier finishes once, whatever the outcome.
func (v *Verifier) Finish(confirmP []byte) ([]byte, error) {
	if v.done {
		return nil, ErrUsed
	}
	v.done = true
	want, key := v.confirmP, v.shared
	v.confirmP, v.shared = nil, nil
	if subtle.ConstantTimeCompare(want, confirmP) != 1 {
		return nil, fmt.Errorf("spake2plus verifier: confirmP: %w", ErrConfirmation)
	}
	return key, nil
}

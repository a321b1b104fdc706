package pairing

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// The setup-code enrollment exchange carries SPAKE2+ in two request and
// response round trips, whichever side is the prover, so that a CoAP
// transport maps each round trip to one confirmable POST:
//
//	gateway is prover (GatewayProver, the default):
//	  1. device -> Hello{device ID}            gateway -> Round1{gateway ID, shareP}
//	  2. device -> Round2{shareV, confirmV}    gateway -> Done{confirmP}
//	gateway is verifier (GatewayVerifier):
//	  1. device -> Hello{device ID, shareP}    gateway -> Round1{gateway ID, shareV, confirmV}
//	  2. device -> Round2{confirmP}            gateway -> Done{}
//
// Nothing in these messages helps an eavesdropper: the code never travels,
// and every run uses fresh ephemeral scalars, so messages replayed from an
// earlier run fail confirmation. The shared key then keys a DTLS-PSK
// session (EnrollmentPSK) in which the device runs EST /sen.

// Message types.
const (
	MsgHello  byte = 1
	MsgRound1 byte = 2
	MsgRound2 byte = 3
	MsgDone   byte = 4

	msgVersion = 1
	maxField   = 256
)

// PAKEMessage is one message of the exchange. Fields depend on Type and
// on the role; absent fields are nil.
type PAKEMessage struct {
	Type    byte
	ID      []byte // Hello: device ID; Round1: gateway ID
	Share   []byte // shareP or shareV
	Confirm []byte // confirmV or confirmP
}

// ErrMalformedPAKE wraps every refusal of a malformed message.
var ErrMalformedPAKE = errors.New("malformed enrollment message")

// MarshalBinary encodes m as: version, type, then three fields (ID, Share,
// Confirm), each a big-endian u16 length and bytes.
func (m PAKEMessage) MarshalBinary() ([]byte, error) {
	b := []byte{msgVersion, m.Type}
	for _, f := range [][]byte{m.ID, m.Share, m.Confirm} {
		if len(f) > maxField {
			return nil, fmt.Errorf("enrollment message: field of %d bytes, limit %d", len(f), maxField)
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	return b, nil
}

// UnmarshalBinary decodes what MarshalBinary writes, refusing unknown
// versions and types, oversized fields and trailing bytes. It checks the
// shapes of shares and confirmations, not their cryptographic validity.
func (m *PAKEMessage) UnmarshalBinary(b []byte) error {
	if len(b) < 2 || b[0] != msgVersion || b[1] < MsgHello || b[1] > MsgDone {
		return fmt.Errorf("%w: unknown version or type", ErrMalformedPAKE)
	}
	out := PAKEMessage{Type: b[1]}
	rest := b[2:]
	fields := []*[]byte{&out.ID, &out.Share, &out.Confirm}
	for _, f := range fields {
		if len(rest) < 2 {
			return fmt.Errorf("%w: truncated", ErrMalformedPAKE)
		}
		n := int(binary.BigEndian.Uint16(rest))
		rest = rest[2:]
		if n > maxField || len(rest) < n {
			return fmt.Errorf("%w: field of %d bytes with %d left", ErrMalformedPAKE, n, len(rest))
		}
		if n > 0 {
			*f = append([]byte(nil), rest[:n]...)
		}
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return fmt.Errorf("%w: %d trailing bytes", ErrMalformedPAKE, len(rest))
	}
	if (out.Share != nil && len(out.Share) != spake2plus.ShareSize) || (out.Confirm != nil && len(out.Confirm) != spake2plus.ConfirmSize) {
		return fmt.Errorf("%w: share or confirmation of the wrong size", ErrMalformedPAKE)
	}
	*m = out
	return nil
}

// PSKIdentityPrefix starts the DTLS PSK identity of an enrollment session.
const PSKIdentityPrefix = "bastion-enroll:"

// EnrollmentPSK derives the DTLS-PSK key and identity of the enrollment
// session from SPAKE2+'s K_shared: HKDF-SHA256 with the device ID in the
// info, so a key is never used for two devices or two purposes.
func EnrollmentPSK(sharedKey []byte, deviceID string) (identity string, psk []byte, err error) {
	if len(sharedKey) != spake2plus.SharedKeySize {
		return "", nil, fmt.Errorf("enrollment psk: shared key of %d bytes, want %d", len(sharedKey), spake2plus.SharedKeySize)
	}
	psk, err = hkdf.Key(sha256.New, sharedKey, nil, "bastion enrollment DTLS-PSK v1\x00"+deviceID, 32)
	if err != nil {
		return "", nil, fmt.Errorf("enrollment psk: %w", err)
	}
	return PSKIdentityPrefix + deviceID, psk, nil
}

// Enroller runs the gateway's side of the setup-code exchange, inside the
// pairing window.
type Enroller struct {
	Window    *Window
	Codes     *Codes
	GatewayID string
	Rand      io.Reader // crypto/rand.Reader
}

// Session is one gateway-side exchange. Not safe for concurrent use.
type Session struct {
	e        *Enroller
	attempt  *Attempt
	record   CodeRecord
	prover   *spake2plus.Prover
	verifier *spake2plus.Verifier
	done     bool
}

// Attempt is the window attempt the session holds; commit it with
// Succeed once EST has issued the device's certificate.
func (s *Session) Attempt() *Attempt { return s.attempt }

// Succeed commits the enrollment once EST has issued the device's
// certificate (see Attempt.Succeed: on error, withhold it) and forgets the
// device's setup code, which has served its one purpose.
func (s *Session) Succeed() error {
	if err := s.attempt.Succeed(); err != nil {
		return err
	}
	s.e.Codes.Remove(s.attempt.Device(), "device enrolled")
	return nil
}

// Hello handles round 1. It claims the window for the device (refused
// when closed, aborting it on overlap) and fails the attempt when the
// device has no registered code.
func (e *Enroller) Hello(msg []byte) (*Session, []byte, error) {
	var m PAKEMessage
	if err := m.UnmarshalBinary(msg); err != nil {
		return nil, nil, fmt.Errorf("enrollment hello: %w", err)
	}
	if m.Type != MsgHello || len(m.ID) == 0 || m.Confirm != nil {
		return nil, nil, fmt.Errorf("enrollment hello: %w: want a hello with a device ID", ErrMalformedPAKE)
	}
	device := string(m.ID)
	a, err := e.Window.Begin(device)
	if err != nil {
		return nil, nil, err
	}
	rec, err := e.Codes.Lookup(device)
	if err != nil {
		a.Fail("no usable setup code")
		return nil, nil, err
	}
	s := &Session{e: e, attempt: a, record: rec}
	ctx := SPAKEContext(rec.Role, e.GatewayID, device)
	reply := PAKEMessage{Type: MsgRound1, ID: []byte(e.GatewayID)}
	if rec.Role == GatewayProver {
		if m.Share != nil {
			a.Fail("hello carried a share for the wrong role")
			return nil, nil, fmt.Errorf("enrollment hello %s: %w: unexpected share (the gateway is the prover)", device, ErrMalformedPAKE)
		}
		s.prover, reply.Share, err = spake2plus.NewProver(ctx, rec.Prover, e.Rand)
	} else {
		s.verifier, reply.Share, reply.Confirm, err = spake2plus.NewVerifier(ctx, rec.Verifier, m.Share, e.Rand)
	}
	if err != nil {
		a.Fail("invalid key share")
		return nil, nil, fmt.Errorf("enrollment hello %s: %w", device, err)
	}
	out, err := reply.MarshalBinary()
	return s, out, err
}

// Finish handles round 2. On success it returns the reply and the DTLS-PSK
// identity and key of the enrollment session; on a wrong setup code the
// attempt fails (and counts toward the window's limit).
func (s *Session) Finish(msg []byte) (reply []byte, pskIdentity string, psk []byte, err error) {
	if s.done {
		return nil, "", nil, spake2plus.ErrUsed
	}
	s.done = true
	device := s.attempt.Device()
	var m PAKEMessage
	if err := m.UnmarshalBinary(msg); err != nil || m.Type != MsgRound2 || m.ID != nil {
		s.attempt.Fail("malformed round 2")
		return nil, "", nil, fmt.Errorf("enrollment %s round 2: %w", device, errors.Join(ErrMalformedPAKE, err))
	}
	var key []byte
	out := PAKEMessage{Type: MsgDone}
	if s.prover != nil {
		out.Confirm, key, err = s.prover.Finish(m.Share, m.Confirm)
	} else {
		key, err = s.verifier.Finish(m.Confirm)
	}
	if err != nil {
		s.attempt.Fail("SPAKE2+ confirmation failed (wrong setup code?)")
		return nil, "", nil, fmt.Errorf("enrollment %s: %w", device, err)
	}
	id, psk, err := EnrollmentPSK(key, device)
	if err != nil {
		s.attempt.Fail("key derivation")
		return nil, "", nil, err
	}
	reply, err = out.MarshalBinary()
	return reply, id, psk, err
}

// Device runs the device's side of the exchange: devicesim uses it, and
// it documents what firmware must do. For a GatewayProver gateway the
// device holds only its verifier record; for a GatewayVerifier gateway it
// derives (w0, w1) from its code.
type Device struct {
	ID       string
	Role     Role // the gateway's role
	Verifier *spake2plus.VerifierRecord
	Prover   *spake2plus.ProverSecret
	Rand     io.Reader

	prover     *spake2plus.Prover
	gatewayID  string
	sharedKey  []byte
	pendingKey *spake2plus.Verifier
}

// Hello makes round 1's request.
func (d *Device) Hello() ([]byte, error) {
	m := PAKEMessage{Type: MsgHello, ID: []byte(d.ID)}
	if d.Role == GatewayVerifier {
		// The transcript needs the gateway's ID, which the device learns
		// only in round 1; shareP does not depend on it, so the context is
		// set when round 1 arrives.
		p, share, err := spake2plus.NewProver(spake2plus.Context{}, d.Prover, d.Rand)
		if err != nil {
			return nil, err
		}
		d.prover, m.Share = p, share
	}
	return m.MarshalBinary()
}

// Round1 takes the gateway's round 1 reply and makes round 2's request.
func (d *Device) Round1(msg []byte) ([]byte, error) {
	var m PAKEMessage
	if err := m.UnmarshalBinary(msg); err != nil || m.Type != MsgRound1 || len(m.ID) == 0 || m.Share == nil {
		return nil, fmt.Errorf("enrollment round 1: %w", errors.Join(ErrMalformedPAKE, err))
	}
	d.gatewayID = string(m.ID)
	ctx := SPAKEContext(d.Role, d.gatewayID, d.ID)
	out := PAKEMessage{Type: MsgRound2}
	if d.Role == GatewayProver {
		v, shareV, confirmV, err := spake2plus.NewVerifier(ctx, d.Verifier, m.Share, d.Rand)
		if err != nil {
			return nil, err
		}
		d.pendingKey, out.Share, out.Confirm = v, shareV, confirmV
	} else {
		d.prover.SetContext(ctx)
		confirmP, key, err := d.prover.Finish(m.Share, m.Confirm)
		if err != nil {
			return nil, err
		}
		out.Confirm, d.sharedKey = confirmP, key
	}
	return out.MarshalBinary()
}

// Done takes the gateway's final reply and returns the DTLS-PSK identity
// and key of the enrollment session, and the gateway's ID.
func (d *Device) Done(msg []byte) (pskIdentity string, psk []byte, gatewayID string, err error) {
	var m PAKEMessage
	if err := m.UnmarshalBinary(msg); err != nil || m.Type != MsgDone {
		return "", nil, "", fmt.Errorf("enrollment done: %w", errors.Join(ErrMalformedPAKE, err))
	}
	if d.Role == GatewayProver {
		if d.pendingKey == nil {
			return "", nil, "", spake2plus.ErrUsed
		}
		key, err := d.pendingKey.Finish(m.Confirm)
		d.pendingKey = nil
		if err != nil {
			return "", nil, "", err
		}
		d.sharedKey = key
	}
	if d.sharedKey == nil {
		return "", nil, "", spake2plus.ErrUsed
	}
	id, psk, err := EnrollmentPSK(d.sharedKey, d.ID)
	return id, psk, d.gatewayID, err
}

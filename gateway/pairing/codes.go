package pairing

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/bastion-iot/bastion/internal/clock"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// SPAKEContextString is the SPAKE2+ context of Bastion's enrollment; it
// names the protocol version and the ciphersuite so that a downgrade or a
// cross-protocol use changes the transcript.
const SPAKEContextString = "bastion-enroll-v1 SPAKE2+ " + spake2plus.Suite

// Role says which SPAKE2+ side the gateway plays for setup codes.
type Role int

const (
	// GatewayProver: the gateway derives w0, w1 from the code the person
	// typed; the device carries only the verifier record (w0, L) in its
	// firmware, as the issue asks (Matter's commissioning arrangement).
	GatewayProver Role = iota
	// GatewayVerifier: the gateway keeps only (w0, L); the device derives
	// w0, w1 from its code at run time. A stolen gateway state then
	// cannot impersonate the device, only be attacked offline.
	GatewayVerifier
)

// Limits on what a person may register.
const (
	MinCodeLen    = 8
	MaxCodeLen    = 64
	MaxCodeTTL    = 30 * 24 * time.Hour
	DefaultTTL    = 24 * time.Hour
	maxDeviceID   = 128
	maxCodeRecord = 1024
)

// Errors the console branches on.
var (
	ErrNoCode      = errors.New("no setup code is registered for this device: register the code on its label in the console first")
	ErrCodeExpired = errors.New("the setup code registered for this device has expired: register it again")
)

// SPAKEContext is the SPAKE2+ context of one enrollment: prover and
// verifier identities are the gateway's and the device's, in the role's
// order.
func SPAKEContext(role Role, gatewayID, deviceID string) spake2plus.Context {
	c := spake2plus.Context{Context: []byte(SPAKEContextString)}
	if role == GatewayProver {
		c.ProverID, c.VerifierID = []byte(gatewayID), []byte(deviceID)
	} else {
		c.ProverID, c.VerifierID = []byte(deviceID), []byte(gatewayID)
	}
	return c
}

// SetupSalt is the scrypt salt for a device's code: fixed per device ID so
// that the factory (which writes the device's record) and the gateway
// (which learns the code from the person) derive the same w0 and w1
// without talking first, and so that no table precomputed for one device
// serves another.
func SetupSalt(deviceID string) []byte {
	h := sha256.Sum256([]byte("bastion setup-code salt v1\x00" + deviceID))
	return h[:16]
}

// DeriveSetupSecret turns a setup code into (w0, w1). Only the device ID
// enters the PBKDF as an identity, because the factory does not know which
// gateway the device will meet (RFC 9383 section 3.2: an unknown identity
// is given as empty). Both identities enter the transcript later.
func DeriveSetupSecret(code []byte, deviceID string, k spake2plus.KDFParams) (*spake2plus.ProverSecret, error) {
	return spake2plus.Register(code, SetupSalt(deviceID), spake2plus.Context{VerifierID: []byte(deviceID)}, k)
}

// CodeRecord is what the gateway keeps for one registered code. The code
// itself is not in it.
type CodeRecord struct {
	Device  string
	Expires time.Time
	Role    Role
	// Prover is set for GatewayProver, Verifier always.
	Prover   *spake2plus.ProverSecret
	Verifier *spake2plus.VerifierRecord
}

// CodeInfo is what the console lists: never any key material.
type CodeInfo struct {
	Device  string
	Expires time.Time
}

// Codes holds registered setup codes in memory. It is a book, not the
// truth: Lookup answers with whatever was registered and has not expired,
// so whoever decides which codes are valid (the gateway's store of
// expected devices) must Remove what it no longer offers before a lookup.
type Codes struct {
	role  Role
	kdf   spake2plus.KDFParams
	clock clock.Clock
	audit AuditFunc

	mu      sync.Mutex
	records map[string]CodeRecord
}

// NewCodes makes an empty code book.
func NewCodes(role Role, kdf spake2plus.KDFParams, clk clock.Clock, audit AuditFunc) (*Codes, error) {
	if err := kdf.Validate(); err != nil {
		return nil, err
	}
	if clk == nil || audit == nil {
		return nil, errors.New("pairing codes: clock and audit are required")
	}
	return &Codes{role: role, kdf: kdf, clock: clk, audit: audit, records: map[string]CodeRecord{}}, nil
}

func (c *Codes) emit(step Step, device, detail string) {
	c.audit(AuditEvent{At: c.clock.Now(), Step: step, Device: device, Detail: detail})
}

// Register derives and keeps the SPAKE2+ record for device's setup code,
// valid for ttl (0 means DefaultTTL). The code is wiped from the slice
// passed in. Registering again replaces the previous code.
func (c *Codes) Register(deviceID string, code []byte, ttl time.Duration) error {
	defer clear(code)
	if err := validateRegistration(deviceID, code, ttl); err != nil {
		c.emit(StepCodeRegisterErr, deviceID, err.Error())
		return err
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	s, err := DeriveSetupSecret(code, deviceID, c.kdf)
	if err != nil {
		return fmt.Errorf("register setup code for %s: %w", deviceID, err)
	}
	r := CodeRecord{Device: deviceID, Expires: c.clock.Now().Add(ttl), Role: c.role, Verifier: s.VerifierRecord()}
	if c.role == GatewayProver {
		r.Prover = s
	}
	c.mu.Lock()
	c.records[deviceID] = r
	c.mu.Unlock()
	c.emit(StepCodeRegistered, deviceID, "expires "+r.Expires.UTC().Format(time.RFC3339))
	return nil
}

func validateRegistration(deviceID string, code []byte, ttl time.Duration) error {
	switch {
	case deviceID == "" || len(deviceID) > maxDeviceID || !utf8.ValidString(deviceID):
		return fmt.Errorf("setup code device id %q: want 1 to %d bytes of UTF-8", deviceID, maxDeviceID)
	case len(code) < MinCodeLen || len(code) > MaxCodeLen:
		return fmt.Errorf("setup code for %s: %d characters, want %d to %d (as printed on the device's label)", deviceID, len(code), MinCodeLen, MaxCodeLen)
	case ttl < 0 || ttl > MaxCodeTTL:
		return fmt.Errorf("setup code for %s: validity %v, want up to %v", deviceID, ttl, MaxCodeTTL)
	}
	return nil
}

// Lookup returns the record for device, refusing an expired one (which is
// then forgotten).
func (c *Codes) Lookup(deviceID string) (CodeRecord, error) {
	c.mu.Lock()
	r, ok := c.records[deviceID]
	expired := ok && !c.clock.Now().Before(r.Expires)
	if expired {
		delete(c.records, deviceID)
	}
	c.mu.Unlock()
	switch {
	case !ok:
		c.emit(StepCodeUnknown, deviceID, "enrollment with a setup code that was never registered")
		return CodeRecord{}, fmt.Errorf("setup code for %s: %w", deviceID, ErrNoCode)
	case expired:
		c.emit(StepCodeExpired, deviceID, "expired "+r.Expires.UTC().Format(time.RFC3339))
		return CodeRecord{}, fmt.Errorf("setup code for %s: %w", deviceID, ErrCodeExpired)
	}
	return r, nil
}

// Remove forgets device's code (after its enrollment, or on request).
func (c *Codes) Remove(deviceID, why string) {
	c.mu.Lock()
	_, ok := c.records[deviceID]
	delete(c.records, deviceID)
	c.mu.Unlock()
	if ok {
		c.emit(StepCodeRemoved, deviceID, why)
	}
}

// List returns the registered, unexpired codes' devices and expiry,
// sorted by device.
func (c *Codes) List() []CodeInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.clock.Now()
	var out []CodeInfo
	for d, r := range c.records {
		if now.Before(r.Expires) {
			out = append(out, CodeInfo{Device: d, Expires: r.Expires})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}

// MarshalBinary encodes a record for the store: version, role, expiry,
// device, then the SPAKE2+ record (w0||w1 for the prover, w0||L for the
// verifier).
func (r CodeRecord) MarshalBinary() ([]byte, error) {
	b := []byte{1, byte(r.Role)}
	b = appendUint64(b, uint64(r.Expires.Unix()))
	b = append(b, byte(len(r.Device)))
	b = append(b, r.Device...)
	var key []byte
	var err error
	if r.Role == GatewayProver {
		if r.Prover == nil {
			return nil, errors.New("code record: prover role without prover secret")
		}
		key, err = r.Prover.MarshalBinary()
	} else {
		key, err = r.Verifier.MarshalBinary()
	}
	if err != nil {
		return nil, err
	}
	return append(b, key...), nil
}

// UnmarshalBinary decodes what MarshalBinary wrote, refusing anything
// else.
func (r *CodeRecord) UnmarshalBinary(b []byte) error {
	if len(b) < 11 || len(b) > maxCodeRecord || b[0] != 1 || b[1] > byte(GatewayVerifier) {
		return errors.New("code record: unknown version, role or size")
	}
	n := int(b[10])
	if len(b) < 11+n {
		return errors.New("code record: truncated device id")
	}
	out := CodeRecord{Role: Role(b[1]), Expires: time.Unix(int64(readUint64(b[2:10])), 0), Device: string(b[11 : 11+n])}
	if err := validateRegistration(out.Device, make([]byte, MinCodeLen), 0); err != nil {
		return fmt.Errorf("code record: %w", err)
	}
	key := b[11+n:]
	if out.Role == GatewayProver {
		out.Prover = new(spake2plus.ProverSecret)
		if err := out.Prover.UnmarshalBinary(key); err != nil {
			return fmt.Errorf("code record %s: %w", out.Device, err)
		}
		out.Verifier = out.Prover.VerifierRecord()
	} else {
		out.Verifier = new(spake2plus.VerifierRecord)
		if err := out.Verifier.UnmarshalBinary(key); err != nil {
			return fmt.Errorf("code record %s: %w", out.Device, err)
		}
	}
	*r = out
	return nil
}

// Restore puts a stored record back (after a restart).
func (c *Codes) Restore(r CodeRecord) error {
	if r.Verifier == nil || (r.Role == GatewayProver && r.Prover == nil) || r.Role != c.role {
		return fmt.Errorf("restore setup code for %s: record does not match role %d", r.Device, c.role)
	}
	c.mu.Lock()
	c.records[r.Device] = r
	c.mu.Unlock()
	return nil
}

func appendUint64(b []byte, v uint64) []byte {
	for i := 7; i >= 0; i-- {
		b = append(b, byte(v>>(8*i)))
	}
	return b
}

func readUint64(b []byte) uint64 {
	var v uint64
	for _, c := range b[:8] {
		v = v<<8 | uint64(c)
	}
	return v
}

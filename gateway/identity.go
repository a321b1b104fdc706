package gateway

import (
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"golang.org/x/crypto/argon2"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/pki"
)

// identity implements bridges.Identity over the CA and the store.
type identity struct {
	ca    *pki.CA
	store *store.Store
	m     *metrics
	// pairing recognises the enrollment PSK identities (pairing.go).
	pairing *pairingSvc
	// secrets bounds concurrent argon2id checks (shared by the gateway).
	secrets *secretChecker
	log     *slog.Logger
}

func (i *identity) VerifyCert(raw [][]byte) (string, error) {
	dev, leaf, err := i.ca.VerifyDevice(raw)
	if err != nil {
		i.m.authFailures.WithLabelValues("certificate").Inc()
		return dev, err
	}
	if i.pairing != nil {
		i.pairing.certUsed(dev, leaf)
	}
	return dev, nil
}

func (i *identity) PSK(identity []byte) (string, []byte, error) {
	if dev, key, err, ok := i.pairing.psk(identity); ok {
		return dev, key, err
	}
	d, err := i.store.DeviceByPSKIdentity(string(identity))
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		// Not the device's fault: counted apart (bridges.ErrLookup).
		return "", nil, fmt.Errorf("PSK identity %q: %w: %w", identity, bridges.ErrLookup, err)
	}
	if err != nil {
		i.m.authFailures.WithLabelValues("psk_unknown").Inc()
		return "", nil, fmt.Errorf("unknown PSK identity %q", identity)
	}
	if d.Revoked || i.ca.Revocations().Revoked(d.ID, "") {
		i.m.authFailures.WithLabelValues("revoked").Inc()
		return d.ID, nil, fmt.Errorf("device %s: %w", d.ID, pki.ErrRevoked)
	}
	if err := i.ca.Clock().Sane(); err != nil {
		return d.ID, nil, err
	}
	return d.ID, i.ca.PSK(string(identity)), nil
}

// CheckSecret verifies an MQTT secret login. The argon2id check costs 19
// MiB for about as long as it runs, so at most secretCheckSlots run at once,
// console logins included (a 128 MiB router would be killed by a few
// more), and a login that finds
// no slot within secretCheckWait is refused with ErrSecretCheckBusy: a
// burst of devices reconnecting after a reboot waits its turn, a flood of
// wrong passwords cannot exhaust memory. An id without secret login is
// checked against a dummy hash under the same bound, so that whether an id
// exists does not show in the time an answer takes. Revoked devices are
// refused before any hashing (that says an id was revoked, nothing more).
func (i *identity) CheckSecret(device string, secret []byte) error {
	if len(secret) > MaxSecretLen {
		i.m.authFailures.WithLabelValues("secret").Inc()
		return fmt.Errorf("device %s: secret of %d bytes, the limit is %d", device, len(secret), MaxSecretLen)
	}
	d, err := i.store.Device(device)
	known := err == nil && d.SecretHash != ""
	if known && d.Revoked {
		i.m.authFailures.WithLabelValues("revoked").Inc()
		return fmt.Errorf("device %s: %w", device, pki.ErrRevoked)
	}
	encoded := dummySecretHash
	if known {
		encoded = d.SecretHash
	}
	ok, err := i.secrets.check(encoded, secret)
	switch {
	case errors.Is(err, ErrSecretCheckBusy):
		// Logged by the transport, at most once per interval: device is
		// the peer's user name, and a flood of logins would flood the log.
		i.m.authFailures.WithLabelValues("secret_busy").Inc()
		return fmt.Errorf("device %s: %w", device, err)
	case err != nil:
		i.m.authFailures.WithLabelValues("secret").Inc()
		return fmt.Errorf("device %s: %w", device, err)
	case !known:
		i.m.authFailures.WithLabelValues("secret").Inc()
		return errors.New("no such device with secret login")
	case !ok:
		i.m.authFailures.WithLabelValues("secret").Inc()
		return errors.New("wrong secret")
	}
	return nil
}

func (i *identity) OnRevoke(f func(device string)) { i.ca.Revocations().Subscribe(f) }

// CertValid: the transports end a certificate session once its
// certificate expired, was retired (renewal.go) or revoked.
func (i *identity) CertValid(device, serial string, notAfter time.Time) error {
	return i.ca.CertValid(device, serial, notAfter)
}

// argon2id parameters for device secrets and console passwords: 64 MiB
// would be too much for a 128 MiB router, so 19 MiB, t=2 (OWASP's minimum
// argon2id configuration).
const (
	argonTime    = 2
	argonMemory  = 19 * 1024
	argonThreads = 1
	argonKeyLen  = 32
)

// HashSecret returns an encoded argon2id hash of secret with a fresh salt.
func HashSecret(secret, salt []byte) string {
	h := argon2.IDKey(secret, salt, argonTime, argonMemory, argonThreads, argonKeyLen)
	return fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$%s$%s", argonMemory, argonTime, argonThreads,
		base64.RawStdEncoding.EncodeToString(salt), base64.RawStdEncoding.EncodeToString(h))
}

// MaxSecretLen bounds the secret handed to argon2id, as the console bounds
// passwords.
const MaxSecretLen = 256

// Concurrent argon2id runs: two (38 MiB) is what a 128 MiB router affords
// beside everything else. The slots are the box's: device secret checks
// and the console's password hashing (consoleBackend's Argon2Slots) take
// them from the same secretChecker. A device login waits a few seconds
// for a slot before it is refused.
const (
	secretCheckSlots = 2
	secretCheckWait  = 3 * time.Second
)

// ErrSecretCheckBusy is returned when no argon2id slot freed up in time.
var ErrSecretCheckBusy = fmt.Errorf("too many secret logins being checked at once: retry in a few seconds: %w", bridges.ErrBusy)

// dummySecretHash is checked for ids without secret login, at the cost of
// a real one.
var dummySecretHash = fmt.Sprintf("$argon2id$v=19$m=%d,t=%d,p=%d$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
	argonMemory, argonTime, argonThreads)

// secretChecker bounds concurrent argon2id runs: device secret checks
// (check) and the console's password hashing (acquire, release).
type secretChecker struct {
	slots chan struct{}
	wait  time.Duration
	// idKey is argon2.IDKey; tests wrap it to count the runs in flight.
	idKey func(password, salt []byte, time, memory uint32, threads uint8, keyLen uint32) []byte
}

func newSecretChecker(n int, wait time.Duration) *secretChecker {
	return &secretChecker{slots: make(chan struct{}, n), wait: wait, idKey: argon2.IDKey}
}

// check reports whether secret matches encoded, or ErrSecretCheckBusy when
// no slot was free within c.wait.
func (c *secretChecker) check(encoded string, secret []byte) (bool, error) {
	m, t, p, salt, want, err := parseSecretHash(encoded)
	if err != nil {
		return false, err
	}
	select {
	case c.slots <- struct{}{}:
	default:
		timer := time.NewTimer(c.wait)
		defer timer.Stop()
		select {
		case c.slots <- struct{}{}:
		case <-timer.C:
			return false, fmt.Errorf("%w (%d running, waited %s)", ErrSecretCheckBusy, cap(c.slots), c.wait)
		}
	}
	defer func() { <-c.slots }()
	got := c.idKey(secret, salt, t, m, p, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}

// acquire takes a slot for an argon2id run outside check (the console's),
// waiting until ctx ends: a person logging in waits rather than being
// refused.
func (c *secretChecker) acquire(ctx context.Context) error {
	select {
	case c.slots <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for an argon2id slot: %w", ctx.Err())
	}
}

// release gives back a slot acquire took.
func (c *secretChecker) release() { <-c.slots }

// parseSecretHash decodes an encoding made by HashSecret. The parameters
// are bounded, so that a tampered store cannot make a login allocate more
// than the slots were sized for.
func parseSecretHash(encoded string) (m, t uint32, p uint8, salt, want []byte, err error) {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return 0, 0, 0, nil, nil, errors.New("stored secret hash is not argon2id: set the secret again (bastionctl device add --auth secret)")
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &p); err != nil {
		return 0, 0, 0, nil, nil, fmt.Errorf("stored secret hash parameters %q: %w", parts[3], err)
	}
	if m == 0 || m > argonMemory || t == 0 || t > 10 || p != argonThreads {
		return 0, 0, 0, nil, nil, fmt.Errorf("stored secret hash parameters %q outside m<=%d, t<=10, p=%d", parts[3], argonMemory, argonThreads)
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[4])
	want, err2 := base64.RawStdEncoding.DecodeString(parts[5])
	if err := errors.Join(err1, err2); err != nil {
		return 0, 0, 0, nil, nil, fmt.Errorf("stored secret hash does not decode: %w", err)
	}
	if len(want) < 16 || len(want) > 64 {
		return 0, 0, 0, nil, nil, fmt.Errorf("stored secret hash has a %d-byte key, want 16 to 64", len(want))
	}
	return m, t, p, salt, want, nil
}

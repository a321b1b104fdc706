package gateway

import (
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/argon2"

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
}

func (i *identity) VerifyCert(raw [][]byte) (string, error) {
	dev, _, err := i.ca.VerifyDevice(raw)
	if err != nil {
		i.m.authFailures.WithLabelValues("certificate").Inc()
		return dev, err
	}
	return dev, nil
}

func (i *identity) PSK(identity []byte) (string, []byte, error) {
	if dev, key, err, ok := i.pairing.psk(identity); ok {
		return dev, key, err
	}
	d, err := i.store.DeviceByPSKIdentity(string(identity))
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

func (i *identity) CheckSecret(device string, secret []byte) error {
	d, err := i.store.Device(device)
	if err != nil || d.SecretHash == "" {
		i.m.authFailures.WithLabelValues("secret").Inc()
		return errors.New("no such device with secret login")
	}
	if d.Revoked {
		i.m.authFailures.WithLabelValues("revoked").Inc()
		return fmt.Errorf("device %s: %w", device, pki.ErrRevoked)
	}
	if !checkSecretHash(d.SecretHash, secret) {
		i.m.authFailures.WithLabelValues("secret").Inc()
		return errors.New("wrong secret")
	}
	return nil
}

func (i *identity) OnRevoke(f func(device string)) { i.ca.Revocations().Subscribe(f) }

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

func checkSecretHash(encoded string, secret []byte) bool {
	parts := strings.Split(encoded, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return false
	}
	var m, t uint32
	var p uint8
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &m, &t, &p); err != nil {
		return false
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[4])
	want, err2 := base64.RawStdEncoding.DecodeString(parts[5])
	if err1 != nil || err2 != nil {
		return false
	}
	got := argon2.IDKey(secret, salt, t, m, p, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1
}

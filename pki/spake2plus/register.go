package spake2plus

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/crypto/scrypt"
)

// KDFParams are the scrypt parameters of registration. RFC 9383 leaves the
// PBKDF to the application; Bastion uses scrypt (RFC 7914) because it is
// memory-hard and the same code runs on the gateway and in devicesim.
// The parameters travel with every record so that stronger ones can be
// adopted later without breaking stored records.
type KDFParams struct {
	// N is the CPU/memory cost, a power of two > 1. Memory is 128*N*R bytes.
	N int
	// R is the block size.
	R int
	// P is the parallelisation.
	P int
}

// DefaultKDFParams are RFC 9383's recommendation for scrypt, (32768, 8, 1):
// 32 MiB of memory and about 100 ms on a router-class core, once per
// registration and once per device run. That fits the 128 MiB boxes.
var DefaultKDFParams = KDFParams{N: 32768, R: 8, P: 1}

// MinSaltSize is the shortest salt Register accepts.
const MinSaltSize = 16

// pbkdfOutput is w0s || w1s, each half 40 bytes (RFC 9383 section 3.2).
const pbkdfOutput = 2 * minHalf

// Validate checks the parameters without running scrypt.
func (k KDFParams) Validate() error {
	if k.N < 2 || k.N&(k.N-1) != 0 {
		return fmt.Errorf("spake2plus scrypt N=%d: want a power of two of at least 2 (default %d)", k.N, DefaultKDFParams.N)
	}
	if k.R < 1 || k.P < 1 || uint64(k.R)*uint64(k.P) >= 1<<30 {
		return fmt.Errorf("spake2plus scrypt r=%d p=%d: want r >= 1, p >= 1 and r*p < 2^30 (default r=%d p=%d)", k.R, k.P, DefaultKDFParams.R, DefaultKDFParams.P)
	}
	if uint64(k.N)*uint64(k.R)*128 > 1<<30 {
		return fmt.Errorf("spake2plus scrypt N=%d r=%d: needs more than 1 GiB of memory", k.N, k.R)
	}
	return nil
}

// Register derives (w0, w1) from a setup code as RFC 9383 section 3.2
// recommends:
//
//	w0s || w1s = scrypt(len(code) || code || len(idProver) || idProver ||
//	                    len(idVerifier) || idVerifier, salt, N, r, p, 80)
//	w0 = w0s mod p, w1 = w1s mod p
//
// with len() as an 8-byte little-endian count. The salt must be at least
// MinSaltSize bytes and is not secret; both sides must use the same salt
// and parameters. The code is not kept.
func Register(code, salt []byte, c Context, k KDFParams) (*ProverSecret, error) {
	if len(code) == 0 {
		return nil, fmt.Errorf("spake2plus register: %w: empty setup code", ErrInvalidSecret)
	}
	if len(salt) < MinSaltSize {
		return nil, fmt.Errorf("spake2plus register: %w: salt is %d bytes, want at least %d", ErrInvalidSecret, len(salt), MinSaltSize)
	}
	if err := k.Validate(); err != nil {
		return nil, err
	}
	var in []byte
	for _, f := range [][]byte{code, c.ProverID, c.VerifierID} {
		in = binary.LittleEndian.AppendUint64(in, uint64(len(f)))
		in = append(in, f...)
	}
	out, err := scrypt.Key(in, salt, k.N, k.R, k.P, pbkdfOutput)
	clear(in)
	if err != nil {
		return nil, fmt.Errorf("spake2plus register: scrypt N=%d r=%d p=%d: %w", k.N, k.R, k.P, err)
	}
	s, err := ProverSecretFromPBKDF(out)
	clear(out)
	if err != nil {
		return nil, fmt.Errorf("spake2plus register: %w", err)
	}
	return s, nil
}

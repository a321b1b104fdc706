// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

// Package prf implements TLS 1.2 Pseudorandom functions
package prf

import (
	"crypto/ecdh"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"

	"github.com/pion/dtls/v3/pkg/crypto/elliptic"
	"github.com/pion/dtls/v3/pkg/protocol"
)

const (
	masterSecretLabel         = "master secret"
	extendedMasterSecretLabel = "extended master secret"
	keyExpansionLabel         = "key expansion"
	verifyDataClientLabel     = "client finished"
	verifyDataServerLabel     = "server finished"
)

// HashFunc allows callers to decide what hash is used in PRF.
type HashFunc func() hash.Hash

// EncryptionKeys is all the state needed for a TLS CipherSuite.
type EncryptionKeys struct {
	MasterSecret   []byte
	ClientMACKey   []byte
	ServerMACKey   []byte
	ClientWriteKey []byte
	ServerWriteKey []byte
	ClientWriteIV  []byte
	ServerWriteIV  []byte
}

var errInvalidNamedCurve = &protocol.FatalError{Err: errors.New("invalid named curve")} //nolint:err113

func (e *EncryptionKeys) String() string {
	return fmt.Sprintf(`encryptionKeys:
- masterSecret: %#v
- clientMACKey: %#v
- serverMACKey: %#v
- clientWriteKey: %#v
- serverWriteKey: %#v
- clientWriteIV: %#v
- serverWriteIV: %#v
`,
		e.MasterSecret,
		e.ClientMACKey,
		e.ServerMACKey,
		e.ClientWriteKey,
		e.ServerWriteKey,
		e.ClientWriteIV,
		e.ServerWriteIV)
}

// PSKPreMasterSecret generates the PSK Premaster Secret
// The premaster secret is formed as follows: if the PSK is N octets
// long, concatenate a uint16 with the value N, N zero octets, a second
// uint16 with the value N, and the PSK itself.
//
// https://tools.ietf.org/html/rfc4279#section-2
func PSKPreMasterSecret(psk []byte) []byte {
	pskLen := uint16(len(psk)) //nolint:gosec // G115

	out := append(make([]byte, 2+pskLen+2), psk...)
	binary.BigEndian.PutUint16(out, pskLen)
	binary.BigEndian.PutUint16(out[2+pskLen:], pskLen)

	return out
}

// EcdhePSKPreMasterSecret implements TLS 1.2 Premaster Secret generation given a psk, a keypair and a curve
//
// https://datatracker.ietf.org/doc/html/rfc5489#section-2
func EcdhePSKPreMasterSecret(psk, publicKey, privateKey []byte, curve elliptic.Curve) ([]byte, error) {
	preMasterSecret, err := PreMasterSecret(publicKey, privateKey, curve)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 2+len(preMasterSecret)+2+len(psk))

	// write preMasterSecret length
	offset := 0
	binary.BigEndian.PutUint16(out[offset:], uint16(len(preMasterSecret))) //nolint:gosec // G115
	offset += 2

	// write preMasterSecret
	copy(out[offset:], preMasterSecret)
	offset += len(preMasterSecret)

	// write psk length
	binary.BigEndian.PutUint16(out[offset:], uint16(len(psk))) //nolint:gosec // G115
	offset += 2

	// write psk
	copy(out[offset:], psk)

	return out, nil
}

// PreMasterSecret implements TLS 1.2 Premaster Secret generation given a keypair and a curve.
func PreMasterSecret(publicKey, privateKey []byte, curve elliptic.Curve) ([]byte, error) {
	var ec ecdh.Curve

	switch curve {
	case elliptic.X25519:
		ec = ecdh.X25519()
	case elliptic.P256:
		ec = ecdh.P256()
	case elliptic.P384:
		ec = ecdh.P384()
	default:
		return nil, errInvalidNamedCurve
	}

	sk, err := ec.NewPrivateKey(privateKey)
	if err != nil {
		return nil, err
	}

	pk, err := ec.NewPublicKey(publicKey) // NIST: SEC1 uncompressed; X25519: 32-byte u
	if err != nil {
		return nil, err
	}

	return sk.ECDH(pk)
}

// PHash is PRF is the SHA-256 hash function is used for all cipher suites
// defined in this TLS 1.2 document and in TLS documents published prior to this
// document when TLS 1.2 is negotiated.  New cipher suites MUST explicitly
// specify a PRF and, in general, SHOULD use the TLS PRF with SHA-256 or a
// stronger standard hash function.
//
//	P_hash(secret, seed) = HMAC_hash(secret, A(1) + seed) +
//	                       HMAC_hash(secret, A(2) + seed) +
//	                       HMAC_hash(secret, A(3) + seed) + ...
//
// A() is defined as:
//
//	A(0) = seed
//	A(i) = HMAC_hash(secret, A(i-1))
//
// P_hash can be iterated as many times as necessary to produce the
// required quantity of data.  For example, if P_SHA256 is being used to
// create 80 bytes of data, it will have to be iterated three times
// (through A(3)), creating 96 bytes of output data; the last 16 bytes
// of the final iteration will then be discarded, leaving 80 bytes of
// output data.
//
// https://tools.ietf.org/html/rfc4346w
func PHash(secret, seed []byte, requestedLength int, hashFunc HashFunc) ([]byte, error) {
	// Bastion patch: one keyed HMAC, Reset between uses, and the output
	// allocated once, instead of two hmac.New (two hash states and the key
	// schedule each) and a growing append per round. Same bytes out:
	// A(i) = HMAC(secret, A(i-1)) with A(0) = seed, and the output is
	// HMAC(secret, A(1) + seed) + HMAC(secret, A(2) + seed) + ...
	if isSHA256(hashFunc) {
		// Bastion patch (23): see phash_sha256_bastion.go.
		return phashSHA256(secret, seed, requestedLength), nil
	}
	mac := hmac.New(hashFunc, secret)
	size := mac.Size()
	iterations := (requestedLength + size - 1) / size
	out := make([]byte, 0, iterations*size)
	if iterations == 0 {
		return out, nil
	}
	if _, err := mac.Write(seed); err != nil {
		return nil, err
	}
	lastRound := mac.Sum(make([]byte, 0, size))
	for i := range iterations {
		mac.Reset()
		if _, err := mac.Write(lastRound); err != nil {
			return nil, err
		}
		if _, err := mac.Write(seed); err != nil {
			return nil, err
		}
		out = mac.Sum(out)
		if i+1 < iterations {
			mac.Reset()
			if _, err := mac.Write(lastRound); err != nil {
				return nil, err
			}
			lastRound = mac.Sum(lastRound[:0])
		}
	}

	return out[:requestedLength], nil
}

// ExtendedMasterSecret generates a Extended MasterSecret as defined in
// https://tools.ietf.org/html/rfc7627
func ExtendedMasterSecret(preMasterSecret, sessionHash []byte, h HashFunc) ([]byte, error) {
	if isSHA256(h) { // Bastion patch (23)
		var buf [seedRoom]byte

		return phashSHA256(preMasterSecret, prfSeed(&buf, extendedMasterSecretLabel, sessionHash, nil), 48), nil
	}
	seed := append([]byte(extendedMasterSecretLabel), sessionHash...)

	return PHash(preMasterSecret, seed, 48, h)
}

// MasterSecret generates a TLS 1.2 MasterSecret.
func MasterSecret(preMasterSecret, clientRandom, serverRandom []byte, h HashFunc) ([]byte, error) {
	seed := append(append([]byte(masterSecretLabel), clientRandom...), serverRandom...)

	return PHash(preMasterSecret, seed, 48, h)
}

// GenerateEncryptionKeys is the final step TLS 1.2 PRF. Given all state generated so far generates
// the final keys need for encryption.
func GenerateEncryptionKeys(
	masterSecret, clientRandom, serverRandom []byte,
	macLen, keyLen, ivLen int,
	h HashFunc,
) (*EncryptionKeys, error) {
	var keyMaterial []byte
	if isSHA256(h) { // Bastion patch (23)
		var buf [seedRoom]byte
		keyMaterial = phashSHA256(masterSecret, prfSeed(&buf, keyExpansionLabel, serverRandom, clientRandom),
			(2*macLen)+(2*keyLen)+(2*ivLen))
	} else {
		seed := append(append([]byte(keyExpansionLabel), serverRandom...), clientRandom...)
		var err error
		keyMaterial, err = PHash(masterSecret, seed, (2*macLen)+(2*keyLen)+(2*ivLen), h)
		if err != nil {
			return nil, err
		}
	}

	clientMACKey := keyMaterial[:macLen]
	keyMaterial = keyMaterial[macLen:]

	serverMACKey := keyMaterial[:macLen]
	keyMaterial = keyMaterial[macLen:]

	clientWriteKey := keyMaterial[:keyLen]
	keyMaterial = keyMaterial[keyLen:]

	serverWriteKey := keyMaterial[:keyLen]
	keyMaterial = keyMaterial[keyLen:]

	clientWriteIV := keyMaterial[:ivLen]
	keyMaterial = keyMaterial[ivLen:]

	serverWriteIV := keyMaterial[:ivLen]

	return &EncryptionKeys{
		MasterSecret:   masterSecret,
		ClientMACKey:   clientMACKey,
		ServerMACKey:   serverMACKey,
		ClientWriteKey: clientWriteKey,
		ServerWriteKey: serverWriteKey,
		ClientWriteIV:  clientWriteIV,
		ServerWriteIV:  serverWriteIV,
	}, nil
}

func prfVerifyData(masterSecret, handshakeBodies []byte, label string, hashFunc HashFunc) ([]byte, error) {
	if isSHA256(hashFunc) { // Bastion patch (23)
		var buf [seedRoom]byte
		sum := sha256.Sum256(handshakeBodies)

		return phashSHA256(masterSecret, prfSeed(&buf, label, sum[:], nil), 12), nil
	}
	h := hashFunc()
	if _, err := h.Write(handshakeBodies); err != nil {
		return nil, err
	}

	seed := append([]byte(label), h.Sum(nil)...)

	return PHash(masterSecret, seed, 12, hashFunc)
}

// verifyDataFromHash is prfVerifyData of a transcript whose hash is
// transcriptHash (Bastion patch (36)): the caller hashes the handshake
// messages where they are instead of merging them into one slice first.
func verifyDataFromHash(masterSecret, transcriptHash []byte, label string, hashFunc HashFunc) ([]byte, error) {
	if isSHA256(hashFunc) {
		var buf [seedRoom]byte

		return phashSHA256(masterSecret, prfSeed(&buf, label, transcriptHash, nil), 12), nil
	}
	seed := append([]byte(label), transcriptHash...)

	return PHash(masterSecret, seed, 12, hashFunc)
}

// VerifyDataClientHash is VerifyDataClient of handshake bodies whose hash
// (with h) is transcriptHash (Bastion patch (36)).
func VerifyDataClientHash(masterSecret, transcriptHash []byte, h HashFunc) ([]byte, error) {
	return verifyDataFromHash(masterSecret, transcriptHash, verifyDataClientLabel, h)
}

// VerifyDataServerHash is VerifyDataServer of handshake bodies whose hash
// (with h) is transcriptHash (Bastion patch (36)).
func VerifyDataServerHash(masterSecret, transcriptHash []byte, h HashFunc) ([]byte, error) {
	return verifyDataFromHash(masterSecret, transcriptHash, verifyDataServerLabel, h)
}

// VerifyDataClient is caled on the Client Side to either verify or generate the VerifyData message.
func VerifyDataClient(masterSecret, handshakeBodies []byte, h HashFunc) ([]byte, error) {
	return prfVerifyData(masterSecret, handshakeBodies, verifyDataClientLabel, h)
}

// VerifyDataServer is caled on the Server Side to either verify or generate the VerifyData message.
func VerifyDataServer(masterSecret, handshakeBodies []byte, h HashFunc) ([]byte, error) {
	return prfVerifyData(masterSecret, handshakeBodies, verifyDataServerLabel, h)
}

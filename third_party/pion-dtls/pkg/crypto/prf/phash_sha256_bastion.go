// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package prf

import (
	"crypto/sha256"
	"reflect"
)

// Bastion patch (23), third_party/README.md: the PRF of every TLS 1.2
// suite Bastion uses is P_SHA256, and a PSK handshake runs it four times
// (extended master secret, key expansion, two Finished). crypto/hmac
// allocates two hash states, two pads and their saved states for every
// key (hmac.New), about nine objects per PHash call, and PHash was 6 % of
// the server's CPU per handshake. With SHA-256 itself as the hash, HMAC
// is computed here with sha256.Sum256 over stack buffers: the pads are
// hashed again for every HMAC (two more SHA-256 blocks each) instead of
// restored from saved states, which costs less than the allocations did.
// The bytes are RFC 2104's HMAC and RFC 5246's P_hash
// (TestPHashSHA256MatchesReference); any other hash function takes the
// generic code.

// sha256New is crypto/sha256.New's code pointer: a HashFunc is SHA-256
// exactly when it is that function (suites return sha256.New itself). A
// wrapper of it is not recognised and takes the generic code.
var sha256New = reflect.ValueOf(sha256.New).Pointer() //nolint:gochecknoglobals

func isSHA256(h HashFunc) bool {
	return h != nil && reflect.ValueOf(h).Pointer() == sha256New
}

// IsSHA256 reports whether h is crypto/sha256.New itself, for which a
// caller may hash with sha256.Sum256 on the stack (Bastion patch (36)).
func IsSHA256(h HashFunc) bool {
	return isSHA256(h)
}

// seedRoom is how much seed the stack buffers of phashSHA256 hold: every
// TLS 1.2 PRF seed (a label and two randoms, or a label and a hash).
const seedRoom = 128

// phashSHA256 is PHash with HMAC-SHA256; its one allocation is the
// output.
func phashSHA256(secret, seed []byte, requestedLength int) []byte {
	iterations := (requestedLength + sha256.Size - 1) / sha256.Size
	out := make([]byte, iterations*sha256.Size)
	if iterations == 0 {
		return out
	}
	// RFC 2104: a key longer than the block is hashed first; a shorter
	// one is padded with zeros.
	var key [sha256.BlockSize]byte
	if len(secret) > sha256.BlockSize {
		sum := sha256.Sum256(secret)
		copy(key[:], sum[:])
	} else {
		copy(key[:], secret)
	}
	// in is the inner hash's input: key ^ ipad, then the message (A(i),
	// then the seed); outer is the outer hash's: key ^ opad, then the
	// inner hash.
	var inArr [sha256.BlockSize + sha256.Size + seedRoom]byte
	in := inArr[:]
	if n := sha256.BlockSize + sha256.Size + len(seed); n > len(in) {
		in = make([]byte, n)
	}
	var outer [sha256.BlockSize + sha256.Size]byte
	for i, k := range key {
		in[i] = k ^ 0x36
		outer[i] = k ^ 0x5c
	}
	mac := func(msgLen int) [sha256.Size]byte {
		inner := sha256.Sum256(in[:sha256.BlockSize+msgLen])
		copy(outer[sha256.BlockSize:], inner[:])

		return sha256.Sum256(outer[:])
	}
	msg := in[sha256.BlockSize:]
	// A(1) = HMAC(secret, seed).
	copy(msg, seed)
	a := mac(len(seed))
	for i := range iterations {
		// msg = A(i) + seed: output block i is HMAC(secret, A(i) + seed).
		copy(msg, a[:])
		copy(msg[sha256.Size:], seed)
		block := mac(sha256.Size + len(seed))
		copy(out[i*sha256.Size:], block[:])
		if i+1 < iterations {
			// A(i+1) = HMAC(secret, A(i)); msg still starts with A(i).
			a = mac(sha256.Size)
		}
	}

	return out[:requestedLength]
}

// prfSeed is label + a + b in buf when they fit (no allocation), else in
// a new slice.
func prfSeed(buf *[seedRoom]byte, label string, a, b []byte) []byte {
	if len(label)+len(a)+len(b) > len(buf) {
		return append(append([]byte(label), a...), b...)
	}

	return append(append(append(buf[:0], label...), a...), b...)
}

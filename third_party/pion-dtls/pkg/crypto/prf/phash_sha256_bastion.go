// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package prf

import (
	"crypto/sha256"
	"encoding"
	"reflect"
)

// Bastion patch (23), third_party/README.md: the PRF of every TLS 1.2
// suite Bastion uses is P_SHA256, and a PSK handshake runs it four times
// (extended master secret, key expansion, two Finished). crypto/hmac
// allocates two hash states, two pads and their saved states for every
// key (hmac.New), about nine objects per PHash call, and PHash was 6 % of
// the server's CPU per handshake. With SHA-256 itself as the hash, HMAC
// is computed here on the stack. (Patch (23) hashed the pads again for
// every HMAC with sha256.Sum256; patch (44) saves the two padded states
// once per call and restores them, in a crypto/sha256 digest that stays
// on the stack.)
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

// sha256StateRoom holds crypto/sha256's marshaled state (108 bytes in
// Go 1.26: a magic, the chaining values, a block and the length).
const sha256StateRoom = 128

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
	// Bastion patch (44): the hash states after the two padded keys are
	// saved once per call and restored for every HMAC, instead of
	// hashing the pads again (two SHA-256 blocks per HMAC). d is
	// crypto/sha256's own digest, which the compiler keeps on the stack
	// (its calls are devirtualized), and the states are in stack buffers.
	var pad [sha256.BlockSize]byte
	d := sha256.New()
	for i, k := range key {
		pad[i] = k ^ 0x36
	}
	d.Write(pad[:]) //nolint:errcheck // a hash.Hash Write never fails
	var innerArr, outerArr [sha256StateRoom]byte
	innerState, err := d.(encoding.BinaryAppender).AppendBinary(innerArr[:0])
	if err != nil {
		panic(err) // crypto/sha256 always marshals its state
	}
	d.Reset()
	for i, k := range key {
		pad[i] = k ^ 0x5c
	}
	d.Write(pad[:]) //nolint:errcheck
	outerState, err := d.(encoding.BinaryAppender).AppendBinary(outerArr[:0])
	if err != nil {
		panic(err)
	}
	// in holds the message: A(i), then the seed.
	var inArr [sha256.Size + seedRoom]byte
	in := inArr[:]
	if n := sha256.Size + len(seed); n > len(in) {
		in = make([]byte, n)
	}
	mac := func(msgLen int) [sha256.Size]byte {
		var inner, sum [sha256.Size]byte
		if err := d.(encoding.BinaryUnmarshaler).UnmarshalBinary(innerState); err != nil {
			panic(err)
		}
		d.Write(in[:msgLen]) //nolint:errcheck
		d.Sum(inner[:0])
		if err := d.(encoding.BinaryUnmarshaler).UnmarshalBinary(outerState); err != nil {
			panic(err)
		}
		d.Write(inner[:]) //nolint:errcheck
		d.Sum(sum[:0])

		return sum
	}
	msg := in
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

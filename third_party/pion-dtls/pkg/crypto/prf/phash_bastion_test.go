// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package prf

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"testing"
)

// referencePHash is RFC 5246 section 5's P_hash written out directly, as
// pion's PHash was before the Bastion patch reused one HMAC.
func referencePHash(secret, seed []byte, n int, h HashFunc) []byte {
	mac := func(data ...[]byte) []byte {
		m := hmac.New(h, secret)
		for _, d := range data {
			m.Write(d)
		}

		return m.Sum(nil)
	}
	var out []byte
	a := seed
	for len(out) < n {
		a = mac(a)
		out = append(out, mac(a, seed)...)
	}

	return out[:n]
}

func TestPHashMatchesReference(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef0123456789abcdef")
	seed := []byte("extended master secret and a session hash of some length")
	for _, h := range []HashFunc{sha256.New, sha512.New384} {
		for n := 0; n <= 150; n++ {
			got, err := PHash(secret, seed, n, h)
			if err != nil {
				t.Fatal(err)
			}
			if want := referencePHash(secret, seed, n, h); !bytes.Equal(got, want) {
				t.Fatalf("PHash(%d bytes) = %x, want %x", n, got, want)
			}
		}
	}
}

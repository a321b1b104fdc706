// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package prf

import (
	"bytes"
	"crypto/sha256"
	"hash"
	"reflect"
	"testing"
)

// sha256Wrapped is SHA-256 that isSHA256 does not recognise: the generic
// code (crypto/hmac).
func sha256Wrapped() hash.Hash { return sha256.New() }

// TestPHashSHA256MatchesReference: P_SHA256 computed over stack buffers
// (Bastion patch (23)) gives RFC 5246's P_hash with crypto/hmac for keys
// shorter than, as long as and longer than the block, seeds that fit the
// stack buffer and seeds that do not, and any output length.
func TestPHashSHA256MatchesReference(t *testing.T) {
	if !isSHA256(sha256.New) || isSHA256(sha256Wrapped) || isSHA256(nil) {
		t.Fatal("isSHA256 does not tell sha256.New from a wrapper of it")
	}
	mk := func(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }
	for _, secretLen := range []int{0, 1, 32, 48, 63, 64, 65, 100, 132, 200} {
		for _, seedLen := range []int{0, 1, 47, 77, 95, 96, 127, 128, 129, 300} {
			secret, seed := mk(secretLen, byte(secretLen)), mk(seedLen, byte(seedLen)+1)
			for n := 0; n <= 100; n++ {
				got, err := PHash(secret, seed, n, sha256.New)
				if err != nil {
					t.Fatal(err)
				}
				if want := referencePHash(secret, seed, n, sha256.New); !bytes.Equal(got, want) {
					t.Fatalf("PHash(secret %d B, seed %d B, %d B) = %x, want %x", secretLen, seedLen, n, got, want)
				}
			}
		}
	}
}

// TestPRFSHA256MatchesGeneric: the functions that take the SHA-256 path
// give what the generic path (crypto/hmac) gives for the same inputs.
func TestPRFSHA256MatchesGeneric(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, 48)
	random1, random2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	for _, bodyLen := range []int{0, 100, 1000} {
		body := bytes.Repeat([]byte{9}, bodyLen)
		for _, f := range []func(HashFunc) ([]byte, error){
			func(h HashFunc) ([]byte, error) { return VerifyDataClient(secret, body, h) },
			func(h HashFunc) ([]byte, error) { return VerifyDataServer(secret, body, h) },
			func(h HashFunc) ([]byte, error) { return ExtendedMasterSecret(secret, random1, h) },
			func(h HashFunc) ([]byte, error) { return ExtendedMasterSecret(secret, bytes.Repeat(random1, 5), h) },
		} {
			want, err := f(sha256Wrapped)
			if err != nil {
				t.Fatal(err)
			}
			got, err := f(sha256.New)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(want, got) {
				t.Errorf("SHA-256 path gives %x, the generic one %x", got, want)
			}
		}
	}
	for _, lens := range [][3]int{{0, 16, 4}, {0, 16, 12}, {32, 16, 16}, {20, 32, 16}} {
		want, err := GenerateEncryptionKeys(secret, random1, random2, lens[0], lens[1], lens[2], sha256Wrapped)
		if err != nil {
			t.Fatal(err)
		}
		got, err := GenerateEncryptionKeys(secret, random1, random2, lens[0], lens[1], lens[2], sha256.New)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(want, got) {
			t.Errorf("GenerateEncryptionKeys %v: SHA-256 path gives %+v, the generic one %+v", lens, got, want)
		}
	}
}

// TestPRFSHA256Allocs: the SHA-256 path allocates only its output (and
// GenerateEncryptionKeys its result).
func TestPRFSHA256Allocs(t *testing.T) {
	secret, body := bytes.Repeat([]byte{7}, 48), bytes.Repeat([]byte{9}, 500)
	random := bytes.Repeat([]byte{1}, 32)
	for name, c := range map[string]struct {
		f    func()
		want float64
	}{
		"PHash":                  {func() { _, _ = PHash(secret, random, 48, sha256.New) }, 1},
		"VerifyDataClient":       {func() { _, _ = VerifyDataClient(secret, body, sha256.New) }, 1},
		"ExtendedMasterSecret":   {func() { _, _ = ExtendedMasterSecret(secret, random, sha256.New) }, 1},
		"GenerateEncryptionKeys": {func() { _, _ = GenerateEncryptionKeys(secret, random, random, 0, 16, 4, sha256.New) }, 2},
	} {
		if got := testing.AllocsPerRun(100, c.f); got > c.want {
			t.Errorf("%s: %.0f allocations, want %.0f", name, got, c.want)
		}
	}
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package ccm

import (
	"bytes"
	"crypto/aes"
	"fmt"
	"testing"
)

func BenchmarkSeal(b *testing.B) {
	blk, err := aes.NewCipher(bytes.Repeat([]byte{7}, 16))
	if err != nil {
		b.Fatal(err)
	}
	c, err := NewCCM(blk, 8, 12)
	if err != nil {
		b.Fatal(err)
	}
	nonce := make([]byte, 12)
	for _, n := range []int{16, 64, 128, 256, 1024} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			pt := make([]byte, n)
			dst := make([]byte, 0, n+16)
			b.ReportAllocs()
			for range b.N {
				c.Seal(dst[:0], nonce, pt, nonce)
			}
		})
	}
}

// TestOpenInPlaceWipesOnFailure: Open decrypts into dst, which may be the
// ciphertext's own buffer; a forged record leaves no plaintext there.
func TestOpenInPlaceWipesOnFailure(t *testing.T) {
	b, err := aes.NewCipher(bytes.Repeat([]byte{7}, 16))
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCCM(b, 8, 12)
	if err != nil {
		t.Fatal(err)
	}
	nonce, ad := make([]byte, 12), []byte("header")
	for _, n := range []int{0, 5, 16, 100, 296} {
		pt := bytes.Repeat([]byte{'p'}, n)
		sealed := c.Seal(nil, nonce, pt, ad)
		buf := append([]byte{}, sealed...)
		got, err := c.Open(buf[:0], nonce, buf, ad)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("%d bytes in place: %q, %v", n, got, err)
		}
		buf = append(buf[:0], sealed...)
		buf[len(buf)-1] ^= 1
		if _, err := c.Open(buf[:0], nonce, buf, ad); err == nil {
			t.Fatalf("%d bytes: forged tag accepted", n)
		}
		if bytes.Contains(buf, []byte("pp")) {
			t.Fatalf("%d bytes: plaintext left in the buffer after a failed Open: %q", n, buf)
		}
	}
}

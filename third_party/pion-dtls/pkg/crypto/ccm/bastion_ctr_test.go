// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package ccm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"testing"
)

// TestBastionXorCTR: xorCTR (Bastion patch) gives crypto/cipher's CTR key
// stream, in place and not, across the inline limit and across a carry out
// of the low counter bytes.
func TestBastionXorCTR(t *testing.T) {
	b, err := aes.NewCipher(bytes.Repeat([]byte{0x5a}, 16))
	if err != nil {
		t.Fatal(err)
	}
	c := &ccm{b: b, M: 8, L: 3}
	ivs := [][ccmBlockSize]byte{{2, 1, 2, 3}, {2, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0xff, 0xff, 0xff, 0xfe}}
	for _, iv := range ivs {
		for n := 0; n <= ctrInlineMax+40; n++ {
			src := make([]byte, n)
			for i := range src {
				src[i] = byte(i * 13)
			}
			want := make([]byte, n)
			cipher.NewCTR(b, iv[:]).XORKeyStream(want, src)
			got := make([]byte, n)
			ivc := iv
			c.xorCTR(getScratch(), &ivc, got, src)
			if !bytes.Equal(want, got) {
				t.Fatalf("iv %x len %d (-want +got):\n-%x\n+%x", iv, n, want, got)
			}
			c.xorCTR(getScratch(), &ivc, src, src)
			if !bytes.Equal(want, src) {
				t.Fatalf("iv %x len %d in place (-want +got):\n-%x\n+%x", iv, n, want, src)
			}
		}
	}
}

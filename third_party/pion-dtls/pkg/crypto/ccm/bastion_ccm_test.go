// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package ccm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// refSeal is CCM as RFC 3610 section 2 writes it, in two passes: the
// CBC-MAC over B0, the encoded additional data and the padded message,
// then CTR through crypto/cipher (the structure of pion's release, which
// crypt replaced with one fused pass: Bastion patch).
func refSeal(b cipher.Block, tagSize int, nonce, plaintext, adata []byte) []byte {
	l := 15 - len(nonce)
	var x [16]byte
	blocks := func(data []byte) {
		for len(data) > 0 {
			var blk [16]byte
			n := copy(blk[:], data)
			data = data[n:]
			for i := range x {
				x[i] ^= blk[i]
			}
			b.Encrypt(x[:], x[:])
		}
	}
	var b0 [16]byte
	if len(adata) > 0 {
		b0[0] = 1 << 6
	}
	b0[0] |= byte((tagSize-2)/2)<<3 | byte(l-1)
	copy(b0[1:], nonce)
	var ln [8]byte
	binary.BigEndian.PutUint64(ln[:], uint64(len(plaintext)))
	copy(b0[16-l:], ln[8-l:])
	blocks(b0[:])
	if len(adata) > 0 {
		var enc []byte
		switch {
		case len(adata) < 0xff00:
			enc = binary.BigEndian.AppendUint16(nil, uint16(len(adata)))
		default:
			enc = binary.BigEndian.AppendUint32([]byte{0xff, 0xfe}, uint32(len(adata)))
		}
		blocks(append(enc, adata...))
	}
	blocks(plaintext)
	var a0 [16]byte
	a0[0] = byte(l - 1)
	copy(a0[1:], nonce)
	var s0 [16]byte
	b.Encrypt(s0[:], a0[:])
	a1 := a0
	a1[15] = 1
	out := make([]byte, len(plaintext), len(plaintext)+tagSize)
	cipher.NewCTR(b, a1[:]).XORKeyStream(out, plaintext)
	for i := range tagSize {
		out = append(out, x[i]^s0[i])
	}

	return out
}

// TestBastionCryptMatchesReference: the fused Seal and Open give the
// two-pass reference's bytes for random keys, nonce and tag sizes,
// additional data and message lengths (partial blocks, the 1 KiB
// firmware block, several KiB), written in place and not; Open refuses a
// flipped bit anywhere and wipes what it decrypted.
func TestBastionCryptMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2)) //nolint:gosec // test data
	fill := func(n int) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}

		return p
	}
	lengths := []int{0, 1, 15, 16, 17, 31, 32, 33, 255, 256, 257, 1023, 1024, 1025, 1040, 1041}
	for range 300 {
		lengths = append(lengths, rng.IntN(5000))
	}
	for i, n := range lengths {
		key := fill([]int{16, 24, 32}[rng.IntN(3)])
		blk, err := aes.NewCipher(key)
		if err != nil {
			t.Fatal(err)
		}
		tagSize := 4 + 2*rng.IntN(7)
		nonceSize := 7 + rng.IntN(7)
		if i%2 == 0 { // as DTLS uses it
			tagSize, nonceSize = []int{8, 16}[rng.IntN(2)], 12
		}
		c, err := NewCCM(blk, tagSize, nonceSize)
		if err != nil {
			t.Fatal(err)
		}
		if n > c.MaxLength() {
			n = c.MaxLength()
		}
		nonce, pt := fill(nonceSize), fill(n)
		adata := fill([]int{0, 13, 16, 30, rng.IntN(100)}[rng.IntN(5)])
		want := refSeal(blk, tagSize, nonce, pt, adata)

		got := c.Seal([]byte("prefix"), nonce, pt, adata)
		if !bytes.Equal(got[:6], []byte("prefix")) || !bytes.Equal(got[6:], want) {
			t.Fatalf("len %d tag %d nonce %d ad %d: Seal (-want +got):\n-%x\n+%x", n, tagSize, nonceSize, len(adata), want, got[6:])
		}
		buf := make([]byte, n, n+tagSize)
		copy(buf, pt)
		if got := c.Seal(buf[:0], nonce, buf, adata); !bytes.Equal(got, want) {
			t.Fatalf("len %d: Seal in place (-want +got):\n-%x\n+%x", n, want, got)
		}

		dec, err := c.Open(nil, nonce, want, adata)
		if err != nil || !bytes.Equal(dec, pt) {
			t.Fatalf("len %d: Open: %v, (-want +got):\n-%x\n+%x", n, err, pt, dec)
		}
		inPlace := append([]byte(nil), want...)
		dec, err = c.Open(inPlace[:0], nonce, inPlace, adata)
		if err != nil || !bytes.Equal(dec, pt) {
			t.Fatalf("len %d: Open in place: %v", n, err)
		}

		bad := append([]byte(nil), want...)
		bit := rng.IntN(len(bad) * 8)
		bad[bit/8] ^= 1 << (bit % 8)
		out := make([]byte, 0, len(bad))
		if _, err := c.Open(out, nonce, bad, adata); err == nil {
			t.Fatalf("len %d: a flipped bit %d was accepted", n, bit)
		}
		if !bytes.Equal(out[:n], make([]byte, n)) {
			t.Fatalf("len %d: plaintext left in dst after a failed Open", n)
		}
		if len(adata) > 0 {
			ad := append([]byte(nil), adata...)
			ad[0] ^= 0x80
			if _, err := c.Open(nil, nonce, want, ad); err == nil {
				t.Fatalf("len %d: changed additional data accepted", n)
			}
		}
	}
}

// TestBastionCounterCarry: the key stream's counter carries across the
// low bytes as crypto/cipher's CTR does (a short nonce leaves 8 counter
// bytes; no real message reaches the carry, the test sets it up).
func TestBastionCounterCarry(t *testing.T) {
	for _, start := range [][16]byte{
		{7: 1, 15: 0xfe},
		{8: 0xff, 9: 0xff, 10: 0xff, 11: 0xff, 12: 0xff, 13: 0xff, 14: 0xff, 15: 0xfe},
	} {
		ctr := start
		ref := start
		for range 4 {
			nextCounter(&ctr)
			for i := 15; i >= 0; i-- {
				ref[i]++
				if ref[i] != 0 {
					break
				}
			}
			if ctr != ref {
				t.Fatalf("from %x (-want +got):\n-%x\n+%x", start, ref, ctr)
			}
		}
	}
}

// TestBastionConcurrentSeal: one key sealing and opening on several
// goroutines at once (macData's CBC encrypter is used by one call at a
// time, the others make their own) gives the reference's bytes.
func TestBastionConcurrentSeal(t *testing.T) {
	blk, err := aes.NewCipher(bytes.Repeat([]byte{3}, 16))
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCCM(blk, 8, 12)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan string, 8)
	for g := range 8 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9)) //nolint:gosec // test data
			for range 300 {
				pt := make([]byte, rng.IntN(3000))
				for i := range pt {
					pt[i] = byte(rng.Uint32())
				}
				nonce, ad := make([]byte, 12), []byte{byte(g), 1, 2}
				binary.BigEndian.PutUint64(nonce[4:], rng.Uint64())
				want := refSeal(blk, 8, nonce, pt, ad)
				if got := c.Seal(nil, nonce, pt, ad); !bytes.Equal(got, want) {
					errs <- "Seal differs from the reference"

					return
				}
				if got, err := c.Open(nil, nonce, want, ad); err != nil || !bytes.Equal(got, pt) {
					errs <- "Open failed"

					return
				}
			}
			errs <- ""
		}()
	}
	for range 8 {
		if e := <-errs; e != "" {
			t.Fatal(e)
		}
	}
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

// Package ccm implements a CCM, Counter with CBC-MAC
// as per RFC 3610.
//
// See https://tools.ietf.org/html/rfc3610
//
// This code was lifted from https://github.com/bocajim/dtls/blob/a3300364a283fcb490d28a93d7fcfa7ba437fbbe/ccm/ccm.go
// and as such was not written by the Pions authors. Like Pions this
// code is licensed under MIT.
//
// A request for including CCM into the Go standard library
// can be found as issue #27484 on the https://github.com/golang/go/
// repository.
package ccm

import (
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"math"
	"sync"
)

// ccm represents a Counter with CBC-MAC with a specific key.
type ccm struct {
	b cipher.Block
	M uint8
	L uint8
	// cbc is macData's CBC encrypter, made on first use; cbcMu is held
	// while it is in use (Bastion patch).
	cbcMu sync.Mutex
	cbc   cbcMode
}

const ccmBlockSize = 16

// CCM is a block cipher in Counter with CBC-MAC mode.
// Providing authenticated encryption with associated data via the cipher.AEAD interface.
type CCM interface {
	cipher.AEAD
	// MaxLength returns the maxium length of plaintext in calls to Seal.
	// The maximum length of ciphertext in calls to Open is MaxLength()+Overhead().
	// The maximum length is related to CCM's `L` parameter (15-noncesize) and
	// is 1<<(8*L) - 1 (but also limited by the maxium size of an int).
	MaxLength() int
}

var (
	errInvalidBlockSize = errors.New("ccm: NewCCM requires 128-bit block cipher")
	errInvalidTagSize   = errors.New("ccm: tagsize must be 4, 6, 8, 10, 12, 14, or 16")
	errInvalidNonceSize = errors.New("ccm: invalid nonce size")
)

// NewCCM returns the given 128-bit block cipher wrapped in CCM.
// The tagsize must be an even integer between 4 and 16 inclusive
// and is used as CCM's `M` parameter.
// The noncesize must be an integer between 7 and 13 inclusive,
// 15-noncesize is used as CCM's `L` parameter.
func NewCCM(b cipher.Block, tagsize, noncesize int) (CCM, error) {
	if b.BlockSize() != ccmBlockSize {
		return nil, errInvalidBlockSize
	}
	if tagsize < 4 || tagsize > 16 || tagsize&1 != 0 {
		return nil, errInvalidTagSize
	}
	lensize := 15 - noncesize
	if lensize < 2 || lensize > 8 {
		return nil, errInvalidNonceSize
	}
	c := &ccm{b: b, M: uint8(tagsize), L: uint8(lensize)} //nolint:gosec // G114

	return c, nil
}

func (c *ccm) NonceSize() int { return 15 - int(c.L) }
func (c *ccm) Overhead() int  { return int(c.M) }
func (c *ccm) MaxLength() int { return maxlen(c.L, c.Overhead()) }

func maxlen(l uint8, tagsize int) int {
	mLen := (uint64(1) << (8 * l)) - 1
	if m64 := uint64(math.MaxInt64) - uint64(tagsize); l > 8 || mLen > m64 { //nolint:gosec // G114
		mLen = m64 // The maximum lentgh on a 64bit arch
	}
	if mLen != uint64(int(mLen)) { //nolint:gosec // G114
		return math.MaxInt32 - tagsize // We have only 32bit int's
	}

	return int(mLen) //nolint:gosec // G114
}

// MaxNonceLength returns the maximum nonce length for a given plaintext length.
// A return value <= 0 indicates that plaintext length is too large for
// any nonce length.
func MaxNonceLength(pdatalen int) int {
	const tagsize = 16
	for L := 2; L <= 8; L++ {
		if maxlen(uint8(L), tagsize) >= pdatalen { //nolint:gosec // G115
			return 15 - L
		}
	}

	return 0
}

func (c *ccm) cbcRound(mac, data []byte) {
	// Two 64-bit XORs, not sixteen byte ones (Bastion patch,
	// third_party/README.md): this runs once per 16 bytes of every record.
	_, _ = mac[ccmBlockSize-1], data[ccmBlockSize-1]
	binary.LittleEndian.PutUint64(mac[0:], binary.LittleEndian.Uint64(mac[0:])^binary.LittleEndian.Uint64(data[0:]))
	binary.LittleEndian.PutUint64(mac[8:], binary.LittleEndian.Uint64(mac[8:])^binary.LittleEndian.Uint64(data[8:]))
	c.b.Encrypt(mac, mac)
}

func (c *ccm) cbcData(mac, data []byte) {
	for len(data) >= ccmBlockSize {
		c.cbcRound(mac, data[:ccmBlockSize])
		data = data[ccmBlockSize:]
	}
	if len(data) > 0 {
		var block [ccmBlockSize]byte
		copy(block[:], data)
		c.cbcRound(mac, block[:])
	}
}

var errPlaintextTooLong = errors.New("ccm: plaintext too large")

// macHeader computes into mac the CBC-MAC of B0 and the additional data,
// the part of the tag before the message's blocks (Bastion patch,
// third_party/README.md: pion's tag returned the whole tag, which escaped,
// an allocation per call; macData adds the message's blocks).
func (c *ccm) macHeader(mac *[ccmBlockSize]byte, nonce []byte, msgLen int, adata []byte) error {
	*mac = [ccmBlockSize]byte{}

	if len(adata) > 0 {
		mac[0] |= 1 << 6
	}
	mac[0] |= (c.M - 2) << 2
	mac[0] |= c.L - 1
	if len(nonce) != c.NonceSize() {
		return errInvalidNonceSize
	}
	if msgLen > c.MaxLength() {
		return errPlaintextTooLong
	}
	binary.BigEndian.PutUint64(mac[ccmBlockSize-8:], uint64(msgLen)) //nolint:gosec // G115, msgLen >= 0
	copy(mac[1:ccmBlockSize-c.L], nonce)
	c.b.Encrypt(mac[:], mac[:])

	var block [ccmBlockSize]byte
	if adataLength := uint64(len(adata)); adataLength > 0 { //nolint:nestif
		// First adata block includes adata length
		// RFC 3610 section 2.2, NIST SP 800-38C A.2.2: lengths of 0xff00 and
		// above are marked with 0xff 0xfe (4-byte length) or 0xff 0xff
		// (8-byte length).
		i := 2
		switch {
		case adataLength <= 0xfeff:
			binary.BigEndian.PutUint16(block[:i], uint16(adataLength))
		case adataLength < uint64(1<<32):
			binary.BigEndian.PutUint16(block[0:2], 0xfffe)
			i = 2 + 4
			binary.BigEndian.PutUint32(block[2:i], uint32(adataLength)) //nolint:gosec // G115
		default:
			binary.BigEndian.PutUint16(block[0:2], 0xffff)
			i = 2 + 8
			binary.BigEndian.PutUint64(block[2:i], adataLength)
		}
		i = copy(block[i:], adata)
		c.cbcRound(mac[:], block[:])
		c.cbcData(mac[:], adata[i:])
	}

	return nil
}

// sliceForAppend takes a slice and a requested number of bytes. It returns a
// slice with the contents of the given slice followed by that many bytes and a
// second slice that aliases into it and contains only the extra bytes. If the
// original slice has sufficient capacity then no allocation is performed.
// From crypto/cipher/gcm.go
// .
func sliceForAppend(in []byte, n int) (head, tail []byte) {
	if total := len(in) + n; cap(in) >= total {
		head = in[:total]
	} else {
		head = make([]byte, total)
		copy(head, in)
	}
	tail = head[len(in):]

	return
}

// ccmScratch holds the blocks of one Seal or Open, which escaped to the
// heap as local arrays (they reach cipher.Block.Encrypt): Bastion patch,
// third_party/README.md.
type ccmScratch struct {
	mac, ctr, s0, ks, tag [ccmBlockSize]byte
	cbcOut                [512]byte // macData's CBC output, thrown away
}

var ccmScratchPool = sync.Pool{New: func() any { return new(ccmScratch) }} //nolint:gochecknoglobals

// getScratch returns zeroed scratch blocks.
func getScratch() *ccmScratch {
	sc, _ := ccmScratchPool.Get().(*ccmScratch)
	*sc = ccmScratch{}

	return sc
}

// start computes the CBC-MAC of B0 and the additional data into sc.mac,
// S0 (the tag's key stream block, counter 0) into sc.s0, and sets sc.ctr
// to counter 1, where the message's key stream starts.
func (c *ccm) start(sc *ccmScratch, nonce []byte, msgLen int, adata []byte) error {
	if err := c.macHeader(&sc.mac, nonce, msgLen, adata); err != nil {
		return err
	}
	ctr := &sc.ctr
	ctr[0] = c.L - 1
	copy(ctr[1:ccmBlockSize-c.L], nonce)
	c.b.Encrypt(sc.s0[:], ctr[:])
	ctr[len(ctr)-1] |= 1

	return nil
}

// nextCounter is crypto/cipher's CTR increment: the whole block as one
// big-endian number. The counter field is the last L bytes and never
// overflows them: MaxLength bounds a message to 2^(8L)-1 bytes.
func nextCounter(ctr *[ccmBlockSize]byte) {
	lo := binary.BigEndian.Uint64(ctr[8:]) + 1
	binary.BigEndian.PutUint64(ctr[8:], lo)
	if lo == 0 {
		binary.BigEndian.PutUint64(ctr[:8], binary.BigEndian.Uint64(ctr[:8])+1)
	}
}

// ctrInlineMax is the longest message crypt encrypts block by block,
// together with its MAC; longer ones go through crypto/cipher's CBC
// (macData) and CTR, whose loops are faster there.
const ctrInlineMax = 256

// crypt runs CTR over the message and the CBC-MAC over the plaintext,
// src to dst (Bastion patch, third_party/README.md). seal: src is the
// plaintext, dst gets the ciphertext; else src is the ciphertext and dst
// gets the plaintext. dst and src alias exactly or not at all.
func (c *ccm) crypt(sc *ccmScratch, dst, src []byte, seal bool) {
	if len(src) > ctrInlineMax {
		if seal { // the MAC reads the plaintext before CTR overwrites it
			c.macData(sc, src)
			cipher.NewCTR(c.b, sc.ctr[:]).XORKeyStream(dst, src)
		} else {
			cipher.NewCTR(c.b, sc.ctr[:]).XORKeyStream(dst, src)
			c.macData(sc, dst[:len(src)])
		}

		return
	}
	c.cryptShort(sc, dst, src, seal)
}

// cryptShort is crypt in one pass, a block at a time, without
// cipher.NewCTR's allocation: each block is read whole before its output
// is written. The MAC's AES calls form a chain, each waiting for the last;
// the key stream block for the same position does not depend on it, so
// the CPU computes it meanwhile.
func (c *ccm) cryptShort(sc *ccmScratch, dst, src []byte, seal bool) {
	mac, ctr, ks := &sc.mac, &sc.ctr, &sc.ks
	dst = dst[:len(src)]
	for len(src) >= ccmBlockSize {
		_, _ = src[ccmBlockSize-1], dst[ccmBlockSize-1]
		s0 := binary.LittleEndian.Uint64(src[0:])
		s1 := binary.LittleEndian.Uint64(src[8:])
		var k0, k1 uint64
		if seal {
			binary.LittleEndian.PutUint64(mac[0:], binary.LittleEndian.Uint64(mac[0:])^s0)
			binary.LittleEndian.PutUint64(mac[8:], binary.LittleEndian.Uint64(mac[8:])^s1)
			c.b.Encrypt(mac[:], mac[:])
			c.b.Encrypt(ks[:], ctr[:])
			k0, k1 = binary.LittleEndian.Uint64(ks[0:]), binary.LittleEndian.Uint64(ks[8:])
		} else {
			c.b.Encrypt(ks[:], ctr[:])
			k0, k1 = binary.LittleEndian.Uint64(ks[0:]), binary.LittleEndian.Uint64(ks[8:])
			binary.LittleEndian.PutUint64(mac[0:], binary.LittleEndian.Uint64(mac[0:])^s0^k0)
			binary.LittleEndian.PutUint64(mac[8:], binary.LittleEndian.Uint64(mac[8:])^s1^k1)
			c.b.Encrypt(mac[:], mac[:])
		}
		nextCounter(ctr)
		binary.LittleEndian.PutUint64(dst[0:], s0^k0)
		binary.LittleEndian.PutUint64(dst[8:], s1^k1)
		dst, src = dst[ccmBlockSize:], src[ccmBlockSize:]
	}
	if len(src) == 0 {
		return
	}
	// The last, partial block: the MAC takes the plaintext padded with
	// zeros.
	var last [ccmBlockSize]byte
	c.b.Encrypt(ks[:], ctr[:])
	if seal {
		copy(last[:], src)
		subtle.XORBytes(dst, src, ks[:len(src)])
	} else {
		subtle.XORBytes(last[:], src, ks[:len(src)])
		copy(dst, last[:len(src)])
	}
	c.cbcRound(mac[:], last[:])
}

// cbcMin is the shortest run of whole blocks macData passes through the
// CBC encrypter: below it, setting the encrypter up costs more than the
// Encrypt calls it saves (a DTLS record of a CoAP request is 2-4 blocks).
const cbcMin = 8 * ccmBlockSize

// cbcMode is crypto/cipher's CBC encrypter for AES, whose IV can be set
// again (crypto/tls uses the same method).
type cbcMode interface {
	cipher.BlockMode
	SetIV(iv []byte)
}

// macData adds data's blocks (the last one padded with zeros) to the
// CBC-MAC in sc.mac. Whole blocks go through crypto/cipher's CBC
// encrypter with the MAC so far as its IV: CBC encryption is the CBC-MAC
// chain, and its loop calls AES without cipher.Block.Encrypt's checks
// for every block (Bastion patch, third_party/README.md: 66 Encrypt
// calls were most of a 1 KiB record's sealing). The encrypter is kept
// with the key (it holds a copy of the key schedule) and used by one
// call at a time.
func (c *ccm) macData(sc *ccmScratch, data []byte) {
	full := len(data) &^ (ccmBlockSize - 1)
	if full >= cbcMin {
		var m cbcMode
		locked := c.cbcMu.TryLock()
		if locked && c.cbc != nil {
			m = c.cbc
		} else if nm, ok := cipher.NewCBCEncrypter(c.b, sc.mac[:]).(cbcMode); ok {
			m = nm
			if locked {
				c.cbc = nm
			}
		}
		if m != nil {
			m.SetIV(sc.mac[:])
			for blocks := data[:full]; len(blocks) > 0; {
				n := min(len(blocks), len(sc.cbcOut))
				m.CryptBlocks(sc.cbcOut[:n], blocks[:n])
				copy(sc.mac[:], sc.cbcOut[n-ccmBlockSize:n])
				blocks = blocks[n:]
			}
			data = data[full:]
		}
		if locked {
			c.cbcMu.Unlock()
		}
	}
	c.cbcData(sc.mac[:], data)
}

// Seal encrypts and authenticates plaintext, authenticates the
// additional data and appends the result to dst, returning the updated
// slice. The nonce must be NonceSize() bytes long and unique for all
// time, for a given key.
// The plaintext must be no longer than MaxLength() bytes long.
//
// The plaintext and dst may alias exactly or not at all.
func (c *ccm) Seal(dst, nonce, plaintext, adata []byte) []byte {
	sc := getScratch()
	defer ccmScratchPool.Put(sc)
	if err := c.start(sc, nonce, len(plaintext), adata); err != nil {
		// The cipher.AEAD interface doesn't allow for an error return.
		panic(err) // nolint
	}
	ret, out := sliceForAppend(dst, len(plaintext)+int(c.M))
	c.crypt(sc, out[:len(plaintext)], plaintext, true)
	tag := out[len(plaintext):]
	for i := range tag {
		tag[i] = sc.mac[i] ^ sc.s0[i]
	}

	return ret
}

var (
	errOpen               = errors.New("ccm: message authentication failed")
	errCiphertextTooShort = errors.New("ccm: ciphertext too short")
	errCiphertextTooLong  = errors.New("ccm: ciphertext too long")
)

func (c *ccm) Open(dst, nonce, ciphertext, adata []byte) ([]byte, error) {
	if len(ciphertext) < int(c.M) {
		return nil, errCiphertextTooShort
	}
	if len(ciphertext) > c.MaxLength()+c.Overhead() {
		return nil, errCiphertextTooLong
	}

	sc := getScratch()
	defer ccmScratchPool.Put(sc)
	ciphertextWithoutTag := ciphertext[:len(ciphertext)-int(c.M)]
	// The tag is read before dst, which may alias the ciphertext, is
	// written.
	tag := sc.tag[:c.M]
	copy(tag, ciphertext[len(ciphertextWithoutTag):])
	if err := c.start(sc, nonce, len(ciphertextWithoutTag), adata); err != nil {
		return nil, err
	}

	// Bastion patch (third_party/README.md): decrypt into dst, as
	// crypto/cipher's GCM does, and wipe it if authentication fails, so
	// the plaintext is still never revealed; pion made a copy per record.
	ret, plaintext := sliceForAppend(dst, len(ciphertextWithoutTag))
	c.crypt(sc, plaintext, ciphertextWithoutTag, false)
	for i := range tag {
		tag[i] ^= sc.s0[i]
	}
	if subtle.ConstantTimeCompare(tag, sc.mac[:c.M]) != 1 {
		clear(plaintext)

		return nil, errOpen
	}

	return ret, nil
}

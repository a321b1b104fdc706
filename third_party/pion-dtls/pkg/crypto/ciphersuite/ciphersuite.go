// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

// Package ciphersuite provides the crypto operations needed for a DTLS CipherSuite
package ciphersuite

import (
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"golang.org/x/crypto/cryptobyte"
)

const (
	// 8 bytes of 0xff.
	// https://datatracker.ietf.org/doc/html/rfc9146#name-record-payload-protection
	seqNumPlaceholder = 0xffffffffffffffff
)

var (
	//nolint:err113
	errNotEnoughRoomForNonce = &protocol.InternalError{Err: errors.New("buffer not long enough to contain nonce")}
	//nolint:err113
	errDecryptPacket = &protocol.TemporaryError{Err: errors.New("failed to decrypt packet")}
	//nolint:err113
	errInvalidMAC = &protocol.TemporaryError{Err: errors.New("invalid mac")}
	//nolint:err113
	errFailedToCast = &protocol.FatalError{Err: errors.New("failed to cast")}
	//nolint:err113
	errNotEnoughRoomForTag = &protocol.InternalError{Err: errors.New("buffer not long enough to contain tag")}
)

// aead provides a generic API to Encrypt/Decrypt DTLS 1.2 Packets.
type aead struct {
	localAEAD     cipher.AEAD
	remoteAEAD    cipher.AEAD
	localWriteIV  []byte
	remoteWriteIV []byte
	nonceLength   int
	tagLength     int
}

// nonceBufferPool holds buffers for nonces, each followed by room for the
// additional data (Bastion patch, third_party/README.md). Bastion patch
// (46): one pool for every connection instead of one per aead, which made
// each new connection's first record allocate the pool's per-P array and
// its first buffers again.
var nonceBufferPool = sync.Pool{ //nolint:gochecknoglobals
	New: func() any {
		b := make([]byte, 0, 12+aeadScratchExtra) // DTLS 1.2's AEAD nonce is 12 bytes

		return &b
	},
}

// getNonce returns a pooled buffer (for putNonce) and its first nonceLength
// bytes, with room for aeadScratchExtra bytes after them.
func (a *aead) getNonce() (*[]byte, []byte) {
	p := nonceBufferPool.Get().(*[]byte) //nolint:forcetypeassert
	if cap(*p) < a.nonceLength+aeadScratchExtra {
		*p = make([]byte, 0, a.nonceLength+aeadScratchExtra)
	}

	return p, (*p)[:a.nonceLength]
}

func putNonce(p *[]byte) { nonceBufferPool.Put(p) }

// aeadScratchExtra is the room for additional data after a pooled nonce:
// 13 bytes without a connection ID, 23 plus the ID's length with one.
// A longer connection ID makes the additional data allocate, as before.
const aeadScratchExtra = 23 + 32

// newAEAD creates a generic DTLS AEAD-based Cipher.
func newAEAD(
	localAEAD cipher.AEAD,
	localWriteIV []byte,
	remoteAEAD cipher.AEAD,
	remoteWriteIV []byte,
	nonceLength int,
	tagLength int,
) *aead {
	return &aead{
		localAEAD:     localAEAD,
		localWriteIV:  localWriteIV,
		remoteAEAD:    remoteAEAD,
		remoteWriteIV: remoteWriteIV,
		nonceLength:   nonceLength,
		tagLength:     tagLength,
	}
}

// encrypt encrypts a DTLS RecordLayer message.
func (a *aead) encrypt(pkt *recordlayer.RecordLayer, raw []byte) ([]byte, error) {
	payload := raw[pkt.Header.Size():]
	raw = raw[:pkt.Header.Size()]

	// Get nonce buffer from pool
	noncePtr, nonce := a.getNonce()

	copy(nonce, a.localWriteIV[:4])

	// https://www.rfc-editor.org/rfc/rfc9325#name-nonce-reuse-in-tls-12
	seq64 := (uint64(pkt.Header.Epoch) << 48) | (pkt.Header.SequenceNumber & 0x0000ffffffffffff)
	binary.BigEndian.PutUint64(nonce[4:], seq64)

	additionalData := appendAEADAdditionalData(nonce[len(nonce):], &pkt.Header, len(payload))
	finalSize := len(raw) + 8 + len(payload) + a.tagLength
	r := make([]byte, finalSize)
	copy(r, raw)
	copy(r[len(raw):], nonce[4:])

	a.localAEAD.Seal(r[len(raw)+8:len(raw)+8], nonce, payload, additionalData)

	// Update recordLayer size to include explicit nonce
	binary.BigEndian.PutUint16(r[pkt.Header.Size()-2:], uint16(len(r)-pkt.Header.Size())) //nolint:gosec //G115

	// Return nonce buffer to pool
	putNonce(noncePtr)

	return r, nil
}

// encryptInPlace encrypts the record in buf as encrypt does, in buf:
// buf[:hdr.Size()] is the record's header as hdr.Marshal writes it,
// the next 8 bytes are room for the explicit nonce, and the rest is the
// plaintext; cap(buf) must leave room for the tag. The result has the
// bytes encrypt returns for the same record (Bastion patch,
// third_party/README.md).
func (a *aead) encryptInPlace(hdr *recordlayer.Header, buf []byte) ([]byte, error) {
	headerSize := hdr.Size()
	if len(buf) < headerSize+8 {
		return nil, errNotEnoughRoomForNonce
	}
	if cap(buf)-len(buf) < a.tagLength {
		return nil, errNotEnoughRoomForTag
	}
	payload := buf[headerSize+8:]

	noncePtr, nonce := a.getNonce()
	copy(nonce, a.localWriteIV[:4])
	seq64 := (uint64(hdr.Epoch) << 48) | (hdr.SequenceNumber & 0x0000ffffffffffff)
	binary.BigEndian.PutUint64(nonce[4:], seq64)

	additionalData := appendAEADAdditionalData(nonce[len(nonce):], hdr, len(payload))
	copy(buf[headerSize:], nonce[4:])
	sealed := a.localAEAD.Seal(payload[:0], nonce, payload, additionalData)
	r := buf[:headerSize+8+len(sealed)]
	binary.BigEndian.PutUint16(r[headerSize-2:], uint16(len(r)-headerSize)) //nolint:gosec //G115

	putNonce(noncePtr)

	return r, nil
}

// decrypt decrypts a DTLS RecordLayer message.
func (a *aead) decrypt(header recordlayer.Header, in []byte) ([]byte, error) {
	err := header.Unmarshal(in)
	switch {
	case err != nil:
		return nil, err
	case header.ContentType == protocol.ContentTypeChangeCipherSpec:
		// Nothing to encrypt with ChangeCipherSpec
		return in, nil
	case len(in) <= (8 + header.Size()):
		return nil, errNotEnoughRoomForNonce
	}

	// Get nonce buffer from pool
	noncePtr, nonce := a.getNonce()

	copy(nonce[:4], a.remoteWriteIV[:4])
	copy(nonce[4:], in[header.Size():header.Size()+8])
	out := in[header.Size()+8:]

	additionalData := appendAEADAdditionalData(nonce[len(nonce):], &header, len(out)-a.tagLength)
	out, err = a.remoteAEAD.Open(out[:0], nonce, out, additionalData)
	if err != nil {
		// Return nonce buffer to pool
		putNonce(noncePtr)

		return nil, fmt.Errorf("%w: %v", errDecryptPacket, err) //nolint:errorlint
	}

	// Return nonce buffer to pool
	putNonce(noncePtr)

	return append(in[:header.Size()], out...), nil
}

// appendAEADAdditionalData appends to dst the additional data that
// generateAEADAdditionalData (or, for a record with a connection ID,
// generateAEADAdditionalDataCID) returns, without allocating when dst has
// room (Bastion patch, third_party/README.md).
func appendAEADAdditionalData(dst []byte, h *recordlayer.Header, payloadLen int) []byte {
	if h.ContentType == protocol.ContentTypeConnectionID {
		dst = binary.BigEndian.AppendUint64(dst, seqNumPlaceholder)
		dst = append(dst,
			uint8(protocol.ContentTypeConnectionID),
			uint8(len(h.ConnectionID)), //nolint:gosec //G115
			uint8(protocol.ContentTypeConnectionID),
			h.Version.Major, h.Version.Minor)
		dst = binary.BigEndian.AppendUint16(dst, h.Epoch)
		dst = append(dst,
			byte(h.SequenceNumber>>40), byte(h.SequenceNumber>>32), byte(h.SequenceNumber>>24),
			byte(h.SequenceNumber>>16), byte(h.SequenceNumber>>8), byte(h.SequenceNumber))
		dst = append(dst, h.ConnectionID...)

		return binary.BigEndian.AppendUint16(dst, uint16(payloadLen)) //nolint:gosec //G115
	}
	dst = binary.BigEndian.AppendUint16(dst, h.Epoch)
	dst = append(dst,
		byte(h.SequenceNumber>>40), byte(h.SequenceNumber>>32), byte(h.SequenceNumber>>24),
		byte(h.SequenceNumber>>16), byte(h.SequenceNumber>>8), byte(h.SequenceNumber),
		byte(h.ContentType), h.Version.Major, h.Version.Minor)

	return binary.BigEndian.AppendUint16(dst, uint16(payloadLen)) //nolint:gosec //G115
}

func generateAEADAdditionalData(h *recordlayer.Header, payloadLen int) []byte {
	var additionalData [13]byte

	// SequenceNumber MUST be set first
	// we only want uint48, clobbering an extra 2 (using uint64, Golang doesn't have uint48)
	binary.BigEndian.PutUint64(additionalData[:], h.SequenceNumber)
	binary.BigEndian.PutUint16(additionalData[:], h.Epoch)
	additionalData[8] = byte(h.ContentType)
	additionalData[9] = h.Version.Major
	additionalData[10] = h.Version.Minor
	//nolint:gosec //G115
	binary.BigEndian.PutUint16(additionalData[len(additionalData)-2:], uint16(payloadLen))

	return additionalData[:]
}

// generateAEADAdditionalDataCID generates additional data for AEAD ciphers
// according to https://datatracker.ietf.org/doc/html/rfc9146#name-aead-ciphers
func generateAEADAdditionalDataCID(h *recordlayer.Header, payloadLen int) []byte {
	var builder cryptobyte.Builder

	builder.AddUint64(seqNumPlaceholder)
	builder.AddUint8(uint8(protocol.ContentTypeConnectionID))
	builder.AddUint8(uint8(len(h.ConnectionID))) //nolint:gosec //G115
	builder.AddUint8(uint8(protocol.ContentTypeConnectionID))
	builder.AddUint8(h.Version.Major)
	builder.AddUint8(h.Version.Minor)
	builder.AddUint16(h.Epoch)
	builder.AddUint48(h.SequenceNumber)
	builder.AddBytes(h.ConnectionID)
	builder.AddUint16(uint16(payloadLen)) //nolint:gosec //G115

	return builder.BytesOrPanic()
}

// examinePadding returns, in constant time, the length of the padding to remove
// from the end of payload. It also returns a byte which is equal to 255 if the
// padding was valid and 0 otherwise. See RFC 2246, Section 6.2.3.2.
//
// https://github.com/golang/go/blob/039c2081d1178f90a8fa2f4e6958693129f8de33/src/crypto/tls/conn.go#L245
func examinePadding(payload []byte) (toRemove int, good byte) {
	if len(payload) < 1 {
		return 0, 0
	}

	paddingLen := payload[len(payload)-1]
	t := uint(len(payload)-1) - uint(paddingLen) //nolint:gosec //G115
	// if len(payload) >= (paddingLen - 1) then the MSB of t is zero
	good = byte(int32(^t) >> 31) //nolint:gosec //G115

	// The maximum possible padding length plus the actual length field
	toCheck := min(
		// The length of the padded data is public, so we can use an if here
		256, len(payload))

	for i := range toCheck {
		t := uint(paddingLen) - uint(i) //nolint:gosec //G115
		// if i <= paddingLen then the MSB of t is zero
		mask := byte(int32(^t) >> 31) //nolint:gosec //G115
		b := payload[len(payload)-1-i]
		good &^= mask&paddingLen ^ mask&b
	}

	// We AND together the bits of good and replicate the result across
	// all the bits.
	good &= good << 4
	good &= good << 2
	good &= good << 1
	good = uint8(int8(good) >> 7) //nolint:gosec //G115

	toRemove = int(paddingLen) + 1

	return toRemove, good
}

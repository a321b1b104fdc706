// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// bastionEcho is ClientHello datagram b (a record starting with a whole
// ClientHello or its first fragment, as helloVerifier.answer takes it)
// with its cookie replaced by cookie: what a client sends back after a
// HelloVerifyRequest. nil if b's fields do not parse; fits is false when
// the longer message's length no longer fits its 24-bit field or the
// record's 16-bit one (a fuzzed length near the top: nothing to echo).
func bastionEcho(b, cookie []byte) (echo []byte, fits bool) {
	const hdr = recordlayer.FixedHeaderSize + handshake.HeaderLength
	if len(b) < hdr {
		return nil, true
	}
	fragLen := int(b[22])<<16 | int(b[23])<<8 | int(b[24])
	if len(b) < hdr+fragLen {
		return nil, true
	}
	body := b[hdr : hdr+fragLen]
	p := 2 + handshake.RandomLength
	if len(body) < p+1 {
		return nil, true
	}
	p += 1 + int(body[p])
	if len(body) < p+1 {
		return nil, true
	}
	start, end := p, p+1+int(body[p])
	if len(body) < end {
		return nil, true
	}
	delta := len(cookie) - (end - start - 1)
	length := (int(b[14])<<16 | int(b[15])<<8 | int(b[16])) + delta
	if length > 0xffffff || hdr+fragLen+delta-recordlayer.FixedHeaderSize > 0xffff {
		return nil, false
	}
	out := append([]byte{}, b[:hdr]...)
	out = append(out, body[:start]...)
	out = append(out, byte(len(cookie)))
	out = append(out, cookie...)
	out = append(out, body[end:]...)
	binary.BigEndian.PutUint16(out[11:], uint16(len(out)-recordlayer.FixedHeaderSize))
	put24 := func(at, v int) { out[at], out[at+1], out[at+2] = byte(v>>16), byte(v>>8), byte(v) }
	put24(14, length)        // length
	put24(22, fragLen+delta) // fragment length
	return out, true
}

// FuzzBastionHelloVerify feeds helloVerifier.answer (the listener's read
// loop, pion-dtls patch (51)) any datagram from an unverified address.
// Seeds: first ClientHellos captured from libcoap's OpenSSL (PSK and
// certificate) and GnuTLS clients (testdata/fuzz/FuzzBastionHelloVerify)
// and pion's own. Whatever comes in: no panic; no answer and admission
// together; an answer is a HelloVerifyRequest of helloVerifyLen bytes in
// the datagram's record number and message sequence number; and the
// datagram echoed with that cookie is admitted, tagged with its record
// and message sequence numbers. helloRandom (patch (54), on the same read
// loop) does not panic either, and finds the random of every ClientHello
// that answer admits or answers.
func FuzzBastionHelloVerify(f *testing.F) {
	f.Add(bastionClientHello(f))
	v, err := newHelloVerifier()
	if err != nil {
		f.Fatal(err)
	}
	from := netip.MustParseAddrPort("192.0.2.7:5684")
	f.Fuzz(func(t *testing.T, b []byte) {
		var reply [256]byte // udp.verifyReplyRoom
		random, isHello := helloRandom(b)
		n, accept, _ := v.answer(b, from, reply[:])
		if accept && n != 0 {
			t.Fatalf("admitted and answered (%d bytes)", n)
		}
		const at = recordlayer.FixedHeaderSize + handshake.HeaderLength + 2 + 4 // version, time
		if (accept || n != 0) && (!isHello || !bytes.Equal(random, b[at:at+handshake.RandomBytesLength])) {
			t.Fatalf("helloRandom of a ClientHello answer takes: %x, %v", random, isHello)
		}
		if n == 0 {
			return
		}
		if n != helloVerifyLen {
			t.Fatalf("answer of %d bytes, want %d", n, helloVerifyLen)
		}
		typ, seq := bastionHandshake(reply[:n])
		if typ != handshake.TypeHelloVerifyRequest || seq != binary.BigEndian.Uint16(b[17:]) {
			t.Fatalf("answer: handshake type %d message %d, want a HelloVerifyRequest numbered %d", typ, seq, binary.BigEndian.Uint16(b[17:]))
		}
		if bastionRecordSeq(reply[:n]) != bastionRecordSeq(b) {
			t.Fatalf("answer in record %d, want %d", bastionRecordSeq(reply[:n]), bastionRecordSeq(b))
		}
		off := recordlayer.FixedHeaderSize + handshake.HeaderLength + 3
		echo, fits := bastionEcho(b, reply[off:off+helloCookieLen])
		if !fits {
			return
		}
		if echo == nil {
			t.Fatal("an answered ClientHello's fields do not parse")
		}
		n2, accept2, tag := v.answer(echo, from, reply[:])
		if !accept2 || n2 != 0 {
			t.Fatalf("the ClientHello echoing its cookie: admitted %v, answer of %d bytes", accept2, n2)
		}
		if want := bastionRecordSeq(b) | uint64(binary.BigEndian.Uint16(b[17:]))<<tagMsgSeqShift; tag != want {
			t.Fatalf("tag %#x, want %#x", tag, want)
		}
	})
}

// The first ClientHellos of libcoap's OpenSSL and GnuTLS clients (the
// fuzz seeds) are answered, and admitted once they echo the cookie.
func TestBastionStatelessHelloVerifyLibcoapHellos(t *testing.T) {
	files, err := filepath.Glob("testdata/fuzz/FuzzBastionHelloVerify/libcoap-*")
	if err != nil || len(files) < 3 {
		t.Fatalf("seeds: %v %v", files, err)
	}
	v, err := newHelloVerifier()
	if err != nil {
		t.Fatal(err)
	}
	from := netip.MustParseAddrPort("[2001:db8::7]:40000")
	for _, name := range files {
		raw, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
		s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[len(lines)-1], "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var reply [256]byte
		n, _, _ := v.answer([]byte(s), from, reply[:])
		if typ, _ := bastionHandshake(reply[:n]); typ != handshake.TypeHelloVerifyRequest {
			t.Fatalf("%s: answered with %d bytes, type %d; want a HelloVerifyRequest", name, n, typ)
		}
		off := recordlayer.FixedHeaderSize + handshake.HeaderLength + 3
		echo, _ := bastionEcho([]byte(s), reply[off:off+helloCookieLen])
		if _, ok, _ := v.answer(echo, from, reply[:]); !ok {
			t.Fatalf("%s: not admitted with its cookie", name)
		}
	}
}

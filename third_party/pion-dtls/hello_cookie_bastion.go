// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"net"
	"net/netip"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// Bastion patch (25), third_party/README.md: a listener answers a
// ClientHello without a cookie with a HelloVerifyRequest itself, on its
// read loop, and makes no connection for it (RFC 6347 4.2.1: "the server
// [...] SHOULD perform the cookie exchange [...] statelessly"). The
// cookie is a MAC of the client's address and the ClientHello's
// parameters (version, random, session ID, cipher suites, compression:
// what must not change in the second ClientHello) under a key of the
// listener, which a new time window changes; a cookie of this window or
// the last is accepted. A connection is made only for a ClientHello with
// a valid cookie, and its handshake starts from there: it sends no
// HelloVerifyRequest of its own. Anything the listener does not read as
// one whole, unfragmented DTLS 1.2 ClientHello in one record takes pion's
// stateful way (a connection whose handshake sends its own
// HelloVerifyRequest), so every client pion served is still served.

// helloCookieWindow is how long a cookie key lasts; a cookie made in the
// last window is accepted too.
const helloCookieWindow = 30 * time.Second

// helloVerified is the accept tag (udp.PacketConn.AcceptTag) of a
// connection made for a ClientHello whose cookie the listener checked.
type helloVerified struct {
	cookie     []byte
	recordSeq  uint64 // the ClientHello's record sequence number
	messageSeq uint16 // the ClientHello's message_seq
}

// helloCookies makes and checks a listener's cookies.
type helloCookies struct {
	key [32]byte
	now func() time.Time
}

func newHelloCookies() (*helloCookies, error) {
	h := &helloCookies{now: time.Now}
	if _, err := rand.Read(h.key[:]); err != nil {
		return nil, err
	}

	return h, nil
}

// clientHelloView is a ClientHello read in place from a datagram.
type clientHelloView struct {
	recordSeq  uint64
	messageSeq uint16
	cookie     []byte
	// fixed are the parameters the cookie covers: version, random and
	// session ID, then cipher suites and compression methods.
	fixed [2][]byte
}

// readClientHello reads b as one record holding one whole DTLS 1.2
// ClientHello (every length checked); ok is false for anything else.
func readClientHello(b []byte) (v clientHelloView, ok bool) {
	const recHdr, hsHdr = recordlayer.FixedHeaderSize, handshake.HeaderLength
	if len(b) < recHdr+hsHdr || protocol.ContentType(b[0]) != protocol.ContentTypeHandshake ||
		binary.BigEndian.Uint16(b[3:]) != 0 || recHdr+int(binary.BigEndian.Uint16(b[11:])) != len(b) {
		return v, false
	}
	v.recordSeq = uint64(binary.BigEndian.Uint16(b[5:]))<<32 | uint64(binary.BigEndian.Uint32(b[7:]))
	h := b[recHdr:]
	length := int(h[1])<<16 | int(h[2])<<8 | int(h[3])
	fragOffset := int(h[6])<<16 | int(h[7])<<8 | int(h[8])
	fragLength := int(h[9])<<16 | int(h[10])<<8 | int(h[11])
	if handshake.Type(h[0]) != handshake.TypeClientHello || fragOffset != 0 || fragLength != length ||
		hsHdr+length != len(h) {
		return v, false
	}
	v.messageSeq = binary.BigEndian.Uint16(h[4:])
	body := h[hsHdr:]
	// version (2), random (32), session ID (1 + n)
	if len(body) < 35 || body[0] != protocol.Version1_2.Major || body[1] != protocol.Version1_2.Minor {
		return v, false
	}
	p := 34 + 1 + int(body[34])
	if body[34] > 32 || len(body) < p+1 {
		return v, false
	}
	v.fixed[0] = body[:p]
	// cookie (1 + n)
	c := p + 1 + int(body[p])
	if len(body) < c+2 {
		return v, false
	}
	v.cookie = body[p+1 : c]
	// cipher suites (2 + n, n even and > 0), compression methods (1 + n, n > 0)
	n := int(binary.BigEndian.Uint16(body[c:]))
	cm := c + 2 + n
	if n == 0 || n%2 != 0 || len(body) < cm+1 {
		return v, false
	}
	end := cm + 1 + int(body[cm])
	if body[cm] == 0 || len(body) < end {
		return v, false
	}
	v.fixed[1] = body[c:end]

	return v, true
}

// cookie is the cookie of v from addr in window w.
func (h *helloCookies) cookie(w int64, addr netip.AddrPort, v *clientHelloView) []byte {
	mac := hmac.New(sha256.New, h.key[:])
	var buf [8 + 16 + 2]byte
	binary.BigEndian.PutUint64(buf[:], uint64(w)) //nolint:gosec // G115
	a16 := addr.Addr().As16()
	copy(buf[8:], a16[:])
	binary.BigEndian.PutUint16(buf[24:], addr.Port())
	_, _ = mac.Write(buf[:])
	_, _ = mac.Write(v.fixed[0])
	_, _ = mac.Write(v.fixed[1])

	return mac.Sum(nil)[:cookieLength]
}

// filter is the listener's udp HelloFilter: see the comment at the top.
func (h *helloCookies) filter(b []byte, raddr net.Addr, reply func([]byte)) (bool, any) {
	u, isUDP := raddr.(*net.UDPAddr)
	if !isUDP {
		return true, nil
	}
	v, ok := readClientHello(b)
	if !ok {
		return true, nil // pion's stateful way
	}
	addr := u.AddrPort()
	w := h.now().UnixNano() / int64(helloCookieWindow)
	if len(v.cookie) > 0 {
		for _, win := range []int64{w, w - 1} {
			if hmac.Equal(v.cookie, h.cookie(win, addr, &v)) {
				return true, &helloVerified{
					cookie: append([]byte(nil), v.cookie...), recordSeq: v.recordSeq, messageSeq: v.messageSeq,
				}
			}
		}
		// A wrong or old cookie gets a new one, as pion's server
		// answered a ClientHello with a cookie it had not made.
	}
	rec := recordlayer.RecordLayer{
		Header: recordlayer.Header{Version: protocol.Version1_2, SequenceNumber: v.recordSeq},
		Content: &handshake.Handshake{Message: &handshake.MessageHelloVerifyRequest{
			Version: protocol.Version1_2, Cookie: h.cookie(w, addr, &v),
		}},
	}
	if raw, err := rec.Marshal(); err == nil {
		reply(raw)
	}

	return false, nil
}

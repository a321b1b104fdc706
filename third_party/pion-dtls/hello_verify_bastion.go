// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/pion/dtls/v3/internal/net/udp"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// Stateless HelloVerifyRequest (Bastion patch (51), Config.StatelessHelloVerify).
//
// RFC 6347 section 4.2.1 makes the cookie exchange a defence against
// spoofed ClientHellos only if the server keeps no state before the cookie
// comes back. pion made a connection (buffers, a goroutine once read) for
// the first ClientHello from every address and kept the cookie in it. Here
// the listener's read loop answers a ClientHello without a valid cookie
// with a HelloVerifyRequest itself and drops it; a connection is made only
// for a ClientHello that echoes a valid one. The cookie binds the client's
// address and the ClientHello's fields up to its compression methods
// (version, random, session ID, cipher suites, compression methods: those
// RFC 6347 requires to stay the same between the ClientHellos) to a time,
// under a key of the listener:
//
//	cookie = t || HMAC-SHA256(key, t || address || port || SHA-256(fields))[:16]
//
// t is 4 bytes, seconds since the listener started on the monotonic clock
// (a router without a real-time clock steps its wall clock at boot), and
// the cookie is valid while t is at most helloCookieLifetime seconds old.
// Those fields come before the extensions, so the first fragment of a
// fragmented ClientHello holds them: the listener answers or admits from
// it (as OpenSSL's DTLSv1_listen does), and later fragments from an
// address without a connection are dropped.
//
// The connection then starts as pion's would after sending its own
// HelloVerifyRequests: the cookie-bearing ClientHello is the one in the
// transcript; the ServerHello's message sequence number is that
// ClientHello's (one HelloVerifyRequest: 1), as every HelloVerifyRequest
// carries the message sequence number of the ClientHello it answers, so a
// client that echoed a stale cookie takes the new one as the next message;
// and, as in OpenSSL, the server's first epoch 0 record number is the
// admitted ClientHello's, which no HelloVerifyRequest used: each carries
// the record number of the ClientHello it answers (RFC 6347 section
// 4.2.1), and the client's replay window has seen those.

const (
	helloCookieLifetime = 30 // seconds
	// helloCookieGrace is how much older the cookie may be when the
	// connection's handshake checks it again: Accept and the handshake's
	// start come after the listener let the ClientHello through.
	helloCookieGrace  = 30 // seconds
	helloCookieMACLen = 16
	helloCookieLen    = 4 + helloCookieMACLen
	helloVerifyLen    = recordlayer.FixedHeaderSize + handshake.HeaderLength + 3 + helloCookieLen
	recordSeqMask     = 1<<48 - 1
	// tagMsgSeqShift places the ClientHello's message sequence above its
	// record sequence number in the listener's accept tag, which has 63
	// bits.
	tagMsgSeqShift = 48
	tagMsgSeqMax   = 1<<15 - 1
)

var errNoVerifiedHello = errors.New("dtls: connection not made for a ClientHello with a verified cookie")

type helloVerifier struct {
	key   [32]byte
	macs  sync.Pool // hash.Hash: HMAC-SHA256 under key
	start time.Time // with a monotonic reading
	now   func() time.Time
}

func newHelloVerifier() (*helloVerifier, error) {
	v := &helloVerifier{start: time.Now(), now: time.Now}
	if _, err := rand.Read(v.key[:]); err != nil {
		return nil, err
	}
	v.macs.New = func() any { return hmac.New(sha256.New, v.key[:]) }

	return v, nil
}

// mac is the cookie's MAC for time t, address ap and ClientHello hash sum.
func (v *helloVerifier) mac(t uint32, ap netip.AddrPort, sum *[sha256.Size]byte) [helloCookieMACLen]byte {
	var in [4 + 16 + 2 + sha256.Size]byte
	binary.BigEndian.PutUint32(in[0:], t)
	addr := ap.Addr().Unmap().As16()
	copy(in[4:], addr[:])
	binary.BigEndian.PutUint16(in[20:], ap.Port())
	copy(in[22:], sum[:])
	m, _ := v.macs.Get().(hash.Hash)
	m.Reset()
	_, _ = m.Write(in[:])
	var full [sha256.Size]byte
	m.Sum(full[:0])
	v.macs.Put(m)
	var out [helloCookieMACLen]byte
	copy(out[:], full[:])

	return out
}

// seconds is the cookie time now: seconds since the verifier was made.
func (v *helloVerifier) seconds() uint32 {
	return uint32(v.now().Sub(v.start) / time.Second) //nolint:gosec // G115: wraps after 136 years, compared by difference
}

func (v *helloVerifier) cookie(ap netip.AddrPort, sum *[sha256.Size]byte) [helloCookieLen]byte {
	return v.cookieAt(v.seconds(), ap, sum)
}

func (v *helloVerifier) cookieAt(t uint32, ap netip.AddrPort, sum *[sha256.Size]byte) [helloCookieLen]byte {
	var c [helloCookieLen]byte
	binary.BigEndian.PutUint32(c[:], t)
	m := v.mac(t, ap, sum)
	copy(c[4:], m[:])

	return c
}

// valid reports whether cookie was made by cookie for ap and sum at most
// maxAge seconds ago.
func (v *helloVerifier) valid(cookie []byte, ap netip.AddrPort, sum *[sha256.Size]byte, maxAge uint32) bool {
	if len(cookie) != helloCookieLen {
		return false
	}
	t := binary.BigEndian.Uint32(cookie)
	if age := v.seconds() - t; age > maxAge {
		return false // old, or not made yet (wraps to a large age)
	}
	m := v.mac(t, ap, sum)

	return hmac.Equal(m[:], cookie[4:])
}

// helloFields parses the start of a ClientHello's body, at least up to
// its compression methods (the first fragment of a fragmented one does),
// and returns its cookie and the SHA-256 of its other fields up to the
// compression methods, as on the wire.
func helloFields(body []byte) (cookie []byte, sum [sha256.Size]byte, ok bool) {
	const fixed = 2 + handshake.RandomLength // version, random
	p := fixed
	if len(body) < p+1 {
		return nil, sum, false
	}
	p += 1 + int(body[p]) // session ID
	if body[fixed] > 32 || len(body) < p+1 {
		return nil, sum, false
	}
	cookieStart := p
	p += 1 + int(body[p])
	if len(body) < p+2 {
		return nil, sum, false
	}
	cookie = body[cookieStart+1 : p]
	cookieEnd := p
	n := int(binary.BigEndian.Uint16(body[p:]))
	p += 2 + n // cipher suites
	if n%2 != 0 || len(body) < p+1 {
		return nil, sum, false
	}
	p += 1 + int(body[p]) // compression methods
	if len(body) < p {
		return nil, sum, false
	}
	h := sha256.New()
	_, _ = h.Write(body[:cookieStart])
	_, _ = h.Write(body[cookieEnd:p])
	h.Sum(sum[:0])

	return cookie, sum, true
}

// answer is the listener's udp.ListenConfig.HelloVerify: it lets through
// a datagram that starts with a ClientHello (in epoch 0, or its first
// fragment) with a valid cookie, tagged with the ClientHello's record and
// message sequence numbers, and answers one without a valid cookie with a
// HelloVerifyRequest in reply. Anything else is dropped: a server
// connection starts with a ClientHello.
func (v *helloVerifier) answer(b []byte, from netip.AddrPort, reply []byte) (int, bool, uint64) {
	if len(b) < recordlayer.FixedHeaderSize+handshake.HeaderLength ||
		protocol.ContentType(b[0]) != protocol.ContentTypeHandshake ||
		binary.BigEndian.Uint16(b[3:]) != 0 { // epoch
		return 0, false, 0
	}
	recordSeq := uint64(binary.BigEndian.Uint16(b[5:]))<<32 | uint64(binary.BigEndian.Uint32(b[7:]))
	body := b[recordlayer.FixedHeaderSize:]
	if n := int(binary.BigEndian.Uint16(b[11:])); n <= len(body) {
		body = body[:n]
	} else {
		return 0, false, 0
	}
	var h handshake.Header
	if err := h.Unmarshal(body); err != nil ||
		h.Type != handshake.TypeClientHello || h.FragmentOffset != 0 || h.FragmentLength > h.Length ||
		int(h.FragmentLength) > len(body)-handshake.HeaderLength || h.MessageSequence > tagMsgSeqMax {
		return 0, false, 0
	}
	cookie, sum, ok := helloFields(body[handshake.HeaderLength : handshake.HeaderLength+int(h.FragmentLength)])
	if !ok {
		return 0, false, 0
	}
	if v.valid(cookie, from, &sum, helloCookieLifetime) {
		return 0, true, recordSeq | uint64(h.MessageSequence)<<tagMsgSeqShift
	}
	// RFC 6347 section 4.2.1: a ClientHello with an invalid cookie is
	// treated as one without; the HelloVerifyRequest carries the
	// ClientHello's record sequence number, and its message sequence
	// number (see above). The bytes are those pion's flight2 sends, with
	// DTLS 1.2 in both version fields.
	if len(reply) < helloVerifyLen {
		return 0, false, 0
	}
	out := reply[:helloVerifyLen]
	out[0] = byte(protocol.ContentTypeHandshake)
	out[1], out[2] = protocol.Version1_2.Major, protocol.Version1_2.Minor
	copy(out[3:11], b[3:11]) // epoch 0 and the ClientHello's record sequence number
	binary.BigEndian.PutUint16(out[11:], uint16(helloVerifyLen-recordlayer.FixedHeaderSize))
	hs := out[recordlayer.FixedHeaderSize:]
	msgLen := 3 + helloCookieLen
	hs[0] = byte(handshake.TypeHelloVerifyRequest)
	hs[1], hs[2], hs[3] = 0, 0, byte(msgLen)
	binary.BigEndian.PutUint16(hs[4:], h.MessageSequence)
	hs[6], hs[7], hs[8] = 0, 0, 0
	hs[9], hs[10], hs[11] = 0, 0, byte(msgLen)
	msg := hs[handshake.HeaderLength:]
	msg[0], msg[1] = protocol.Version1_2.Major, protocol.Version1_2.Minor
	msg[2] = helloCookieLen
	c := v.cookie(from, &sum)
	copy(msg[3:], c[:])

	return helloVerifyLen, false, 0
}

// startVerified sets up a server connection that the listener made for a
// ClientHello whose cookie v verified: its handshake starts as pion's does
// after its own HelloVerifyRequest.
func (c *Conn) startVerified(v *helloVerifier, pc net.PacketConn, raddr net.Addr) error {
	lc, ok := pc.(*udp.PacketConn)
	if !ok {
		return errStatelessNeedsListen
	}
	tag, ok := lc.AcceptTag()
	ua, isUDP := raddr.(*net.UDPAddr)
	if !ok || !isUDP {
		return errNoVerifiedHello
	}
	c.handshakeMutex.Lock()
	defer c.handshakeMutex.Unlock()
	c.handshakeConfig.helloVerifier = v
	c.handshakeConfig.helloVerifyAddr = ua.AddrPort()
	msgSeq := uint16(tag >> tagMsgSeqShift) //nolint:gosec // G115: at most tagMsgSeqMax
	c.fragmentBuffer.currentMessageSequenceNumber = msgSeq
	c.state.handshakeRecvSequence = int(msgSeq)
	// The ServerHello follows HelloVerifyRequests numbered as the
	// ClientHellos they answered, up to this one's.
	c.state.handshakeSendSequence = int(msgSeq)
	c.state.localSequenceNumber = []uint64{tag & recordSeqMask}
	// Bastion patch (54): a new handshake from the address, once this
	// one has completed, replaces this connection (hello_again_bastion.go).
	c.helloAgain.c = c
	lc.SetReplacer(&c.helloAgain)

	return nil
}

// flight0ParseVerified is flight0Parse, then flight2Parse, for a
// connection the listener made for a ClientHello with a verified cookie.
func flight0ParseVerified(
	state *State,
	cache *handshakeCache,
	cfg *handshakeConfig,
) (flightVal, *alert.Alert, error) {
	seq, msgs, ok := cache.fullPullMap(state.handshakeRecvSequence, state.cipherSuite,
		handshakeCachePullRule{handshake.TypeClientHello, cfg.initialEpoch, true, false},
	)
	if !ok {
		return 0, nil, nil
	}
	state.setLocalConnectionID(nil)
	state.remoteConnectionID = nil
	clientHello, ok := msgs[handshake.TypeClientHello].(*handshake.MessageClientHello)
	if !ok {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.InternalError}, nil
	}
	if !clientHello.Version.Equal(protocol.Version1_2) {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.ProtocolVersion}, errUnsupportedProtocolVersion
	}
	// (No initialClientHelloHash: only flight2Parse compares it, and this
	// connection never runs flight2Parse; the cookie binds the fields.)
	// The listener checked the cookie of the ClientHello's first fragment;
	// this is the whole ClientHello the handshake uses, a little later.
	raw := cache.pullOne(handshakeCachePullRule{handshake.TypeClientHello, cfg.initialEpoch, true, false})
	if raw == nil || len(raw.data) < handshake.HeaderLength {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.InternalError}, nil
	}
	cookie, sum, ok := helloFields(raw.data[handshake.HeaderLength:])
	if !ok || !cfg.helloVerifier.valid(cookie, cfg.helloVerifyAddr, &sum, helloCookieLifetime+helloCookieGrace) {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.AccessDenied}, errCookieMismatch
	}
	if err := cfg.cookieVerified(); err != nil {
		return 0, nil, err
	}
	state.handshakeRecvSequence = seq

	return negotiateClientHello(clientHello, state, cfg, flight4)
}

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
// address and the ClientHello's negotiated parameters (the ones RFC 6347
// requires to stay the same between the two ClientHellos) to a time, under
// a key of the listener:
//
//	cookie = t (4 bytes, Unix seconds) || HMAC-SHA256(key, t || address || hash)[:16]
//
// valid for helloCookieLifetime. The connection then starts as pion's
// would after sending its own HelloVerifyRequest: the cookie-bearing
// ClientHello is the one in the transcript, the ServerHello is handshake
// message 1, and (as OpenSSL's DTLSv1_listen does) the server's first
// epoch 0 record number is the second ClientHello's, which no
// HelloVerifyRequest used: each carries the record number of the
// ClientHello it answers (RFC 6347 section 4.2.1), and the client's replay
// window has seen those.

const (
	helloCookieLifetime = 30 // seconds
	helloCookieMACLen   = 16
	helloCookieLen      = 4 + helloCookieMACLen
	helloVerifyLen      = recordlayer.FixedHeaderSize + handshake.HeaderLength + 3 + helloCookieLen
	recordSeqMask       = 1<<48 - 1
	// tagMsgSeqShift places the ClientHello's message sequence above its
	// record sequence number in the listener's accept tag, which has 63
	// bits.
	tagMsgSeqShift = 48
	tagMsgSeqMax   = 1<<15 - 1
)

var errNoVerifiedHello = errors.New("dtls: connection not made for a ClientHello with a verified cookie")

type helloVerifier struct {
	key  [32]byte
	macs sync.Pool // hash.Hash: HMAC-SHA256 under key
	now  func() time.Time
}

func newHelloVerifier() (*helloVerifier, error) {
	v := &helloVerifier{now: time.Now}
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

func (v *helloVerifier) cookie(ap netip.AddrPort, sum *[sha256.Size]byte) [helloCookieLen]byte {
	return v.cookieAt(uint32(v.now().Unix()), ap, sum) //nolint:gosec // G115: wraps in 2106, compared by difference
}

func (v *helloVerifier) cookieAt(t uint32, ap netip.AddrPort, sum *[sha256.Size]byte) [helloCookieLen]byte {
	var c [helloCookieLen]byte
	binary.BigEndian.PutUint32(c[:], t)
	m := v.mac(t, ap, sum)
	copy(c[4:], m[:])

	return c
}

// valid reports whether cookie was made by cookie for ap and sum within
// helloCookieLifetime.
func (v *helloVerifier) valid(cookie []byte, ap netip.AddrPort, sum *[sha256.Size]byte) bool {
	if len(cookie) != helloCookieLen {
		return false
	}
	t := binary.BigEndian.Uint32(cookie)
	if age := uint32(v.now().Unix()) - t; age > helloCookieLifetime { //nolint:gosec // G115, as in cookie
		return false // old, or from a clock since set back
	}
	m := v.mac(t, ap, sum)

	return hmac.Equal(m[:], cookie[4:])
}

// answer is the listener's udp.ListenConfig.HelloVerify: it lets through
// a datagram that starts with an unfragmented ClientHello (in epoch 0)
// with a valid cookie, tagged with the ClientHello's record and message
// sequence numbers, and answers one without a valid cookie with a
// HelloVerifyRequest in reply. Anything else is dropped: a server
// connection starts with a ClientHello, and one that is fragmented cannot
// be verified without keeping its fragments (OpenSSL drops those too).
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
		h.Type != handshake.TypeClientHello || h.FragmentOffset != 0 || h.FragmentLength != h.Length ||
		int(h.Length) > len(body)-handshake.HeaderLength || h.MessageSequence > tagMsgSeqMax {
		return 0, false, 0
	}
	var hello handshake.MessageClientHello
	if err := hello.Unmarshal(body[handshake.HeaderLength : handshake.HeaderLength+int(h.Length)]); err != nil {
		return 0, false, 0
	}
	sum, err := clientHelloNegotiationHash(&hello)
	if err != nil {
		return 0, false, 0
	}
	if v.valid(hello.Cookie, from, &sum) {
		return 0, true, recordSeq | uint64(h.MessageSequence)<<tagMsgSeqShift
	}
	// RFC 6347 section 4.2.1: a ClientHello with an invalid cookie is
	// treated as one without; the HelloVerifyRequest carries the
	// ClientHello's record sequence number. The bytes are those pion's
	// flight2 sends, with DTLS 1.2 in both version fields.
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
	hs[4], hs[5] = 0, 0 // the server's first handshake message
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
	c.state.localSequenceNumber = []uint64{tag & recordSeqMask}

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
	helloHash, err := clientHelloNegotiationHash(clientHello)
	if err != nil {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.IllegalParameter}, err
	}
	// The listener checked it; this is the ClientHello the handshake uses.
	if !cfg.helloVerifier.valid(clientHello.Cookie, cfg.helloVerifyAddr, &helloHash) {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.AccessDenied}, errCookieMismatch
	}
	state.initialClientHelloHash = helloHash
	state.handshakeSendSequence = 1 // the HelloVerifyRequest was message 0
	if hook := cfg.onCookieVerified; hook != nil {
		cfg.onCookieVerified = nil
		if err := hook(); err != nil {
			return 0, nil, err
		}
	}
	state.handshakeRecvSequence = seq

	return negotiateClientHello(clientHello, state, cfg, flight4)
}

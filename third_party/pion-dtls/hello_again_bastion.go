// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"encoding/binary"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// A new handshake from the address of an established session (Bastion
// patch (54), with Config.StatelessHelloVerify).
//
// A device with a fixed source port that restarts sends its ClientHello
// from the address and port of its old session. The listener routed it to
// that session, which dropped it (patch (53); before, it answered with its
// last flight), so the device was not answered until the old session
// ended. RFC 6347 section 4.2.8: a server that receives a ClientHello on an
// existing association SHOULD proceed with a new handshake, after a cookie
// exchange, and end the old association only once the client has shown
// that it receives at the address, so that a ClientHello forged with a
// device's address cannot end its session. Here the listener offers such a
// ClientHello to the stateless verifier (hello_verify_bastion.go) as if the
// address had no connection: one without a valid cookie gets a
// HelloVerifyRequest and the old session goes on; one with a valid cookie
// ends the old session and starts a new connection, as a first ClientHello
// with a valid cookie does.
//
// A ClientHello with the random of the one that set up the session is not
// a new handshake: the client retransmitted it (its cookie stays valid for
// a while) or it was duplicated on the way; it goes to the session, which
// drops it (patch (53)).

// helloReplacer is a server connection's udp.Replacer.
type helloReplacer struct{ c *Conn }

// NewHello reports whether b starts with a ClientHello (in epoch 0, whole
// or its first fragment) other than the one that set up the session, once
// the session is established. It runs on the listener's read loop.
func (r *helloReplacer) NewHello(b []byte) bool {
	random, ok := helloRandom(b)
	if !ok || !r.c.isHandshakeCompletedSuccessfully() {
		return false
	}
	// Written by flight0ParseVerified, before the handshake completed.
	return !bytes.Equal(random, r.c.state.remoteRandom.RandomBytes[:])
}

// EndForHello closes the connection without a close_notify: its peer
// has started a new handshake from the address and keeps no keys for this
// session, so the alert would only reach the new one as a record it cannot
// read. The record reader then ends as for any close (the read handler's
// io.EOF, Read's end). It runs on the listener's read loop: close does not
// wait.
func (r *helloReplacer) EndForHello() {
	r.c.log.Debug("new handshake from the peer's address: session closed")
	_ = r.c.close(false)
}

// helloRandom is the random bytes (past its time) of the ClientHello that
// datagram b starts with, in epoch 0, whole or its first fragment.
func helloRandom(b []byte) ([]byte, bool) {
	const head = recordlayer.FixedHeaderSize + handshake.HeaderLength
	const end = 2 + handshake.RandomLength // version, random
	if len(b) < head+end ||
		protocol.ContentType(b[0]) != protocol.ContentTypeHandshake ||
		binary.BigEndian.Uint16(b[3:]) != 0 { // epoch
		return nil, false
	}
	body := b[recordlayer.FixedHeaderSize:]
	if n := int(binary.BigEndian.Uint16(b[11:])); n <= len(body) {
		body = body[:n]
	} else {
		return nil, false
	}
	var h handshake.Header
	if err := h.Unmarshal(body); err != nil ||
		h.Type != handshake.TypeClientHello || h.FragmentOffset != 0 ||
		h.FragmentLength < end || int(h.FragmentLength) > len(body)-handshake.HeaderLength {
		return nil, false
	}

	return body[handshake.HeaderLength+end-handshake.RandomBytesLength : handshake.HeaderLength+end], true
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

func flight2Parse(
	_ context.Context,
	_ flightConn,
	state *State,
	cache *handshakeCache,
	cfg *handshakeConfig,
) (flightVal, *alert.Alert, error) {
	seq, msgs, ok := cache.fullPullMap(state.handshakeRecvSequence, state.cipherSuite,
		handshakeCachePullRule{handshake.TypeClientHello, cfg.initialEpoch, true, false},
	)
	if !ok {
		// The FSM retransmits the cached response only for a repeated ClientHello.
		return 0, nil, nil
	}

	var clientHello *handshake.MessageClientHello

	// Validate type
	if clientHello, ok = msgs[handshake.TypeClientHello].(*handshake.MessageClientHello); !ok {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.InternalError}, nil
	}

	if !clientHello.Version.Equal(protocol.Version1_2) {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.ProtocolVersion}, errUnsupportedProtocolVersion
	}

	if len(clientHello.Cookie) == 0 {
		return 0, nil, nil
	}
	if !bytes.Equal(state.cookie, clientHello.Cookie) {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.AccessDenied}, errCookieMismatch
	}
	helloHash, err := clientHelloNegotiationHash(clientHello)
	if err != nil {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.IllegalParameter}, err
	}
	if helloHash != state.initialClientHelloHash {
		return 0, &alert.Alert{Level: alert.Fatal, Description: alert.IllegalParameter}, errClientHelloChanged
	}
	// Bastion patch (50): the peer has proven it receives at its address.
	// flight2Parse runs again only for a retransmitted ClientHello, which
	// the FSM answers before parsing (isClientHelloRetransmit), so the
	// hook runs once; it is cleared all the same.
	if err := cfg.cookieVerified(); err != nil {
		return 0, nil, err
	}
	state.handshakeRecvSequence = seq

	return negotiateClientHello(clientHello, state, cfg, flight4)
}

// RFC 6347 section 4.2.1 requires these core parameters to stay unchanged
// across HelloVerifyRequest. Extensions are negotiated from the retry.
func clientHelloNegotiationHash(hello *handshake.MessageClientHello) ([sha256.Size]byte, error) {
	if sum, ok := clientHelloNegotiationHashStack(hello); ok {
		return sum, nil
	}
	normalized := *hello
	normalized.Cookie = nil
	normalized.Extensions = nil
	raw, err := normalized.Marshal()
	if err != nil {
		return [sha256.Size]byte{}, err
	}

	return sha256.Sum256(raw), nil
}

func flight2Generate(
	_ flightConn,
	state *State,
	_ *handshakeCache,
	_ *handshakeConfig,
) ([]*packet, *alert.Alert, error) {
	state.handshakeSendSequence = 0

	return []*packet{
		{
			record: &recordlayer.RecordLayer{
				Header: recordlayer.Header{
					Version: protocol.Version1_2,
				},
				Content: &handshake.Handshake{
					Message: &handshake.MessageHelloVerifyRequest{
						Version: protocol.Version1_2,
						Cookie:  state.cookie,
					},
				},
			},
		},
	}, nil, nil
}

// negotiationHashRoom is how long a normalized ClientHello
// clientHelloNegotiationHashStack writes on the stack: one with 470
// cipher suites.
const negotiationHashRoom = 1024

// clientHelloNegotiationHashStack is clientHelloNegotiationHash written
// into a buffer on the stack (Bastion patch (40)): the bytes
// MessageClientHello.Marshal makes of hello without cookie and extensions
// (version, random, session ID, an empty cookie, the cipher suites, the
// compression methods in Marshal's order, an empty extension block),
// without its seven or more allocations. It returns false, and the caller
// marshals, for what Marshal refuses or what does not fit.
func clientHelloNegotiationHashStack(hello *handshake.MessageClientHello) ([sha256.Size]byte, bool) {
	n := 2 + handshake.RandomLength + 1 + len(hello.SessionID) + 1 +
		2 + 2*len(hello.CipherSuiteIDs) + 1 + len(hello.CompressionMethods) + 2
	if len(hello.SessionID) > 255 || len(hello.CompressionMethods) > 255 || n > negotiationHashRoom {
		return [sha256.Size]byte{}, false
	}
	var buf [negotiationHashRoom]byte
	out := append(buf[:0], hello.Version.Major, hello.Version.Minor)
	random := hello.Random.MarshalFixed()
	out = append(out, random[:]...)
	out = append(out, byte(len(hello.SessionID))) //nolint:gosec // G115: at most 255, checked above
	out = append(out, hello.SessionID...)
	out = append(out, 0)                                                          // no cookie
	out = binary.BigEndian.AppendUint16(out, uint16(len(hello.CipherSuiteIDs)*2)) //nolint:gosec // G115, as encodeCipherSuiteIDs
	for _, id := range hello.CipherSuiteIDs {
		out = binary.BigEndian.AppendUint16(out, id)
	}
	out = append(out, byte(len(hello.CompressionMethods))) //nolint:gosec // G115: at most 255, checked above
	for i := len(hello.CompressionMethods); i > 0; i-- {
		// protocol.EncodeCompressionMethods writes them last first.
		out = append(out, byte(hello.CompressionMethods[i-1].ID))
	}
	out = append(out, 0, 0) // no extensions

	return sha256.Sum256(out), true
}

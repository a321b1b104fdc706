// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patches (59) and (60) (third_party/README.md): once
// a server's handshake has completed, only the peer's retransmitted
// Finished has it send its last flight again, and fragments of handshake
// messages to come are dropped, not kept.

package dtls

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
)

// lastFlightPair is a PSK client and the listener's connection it has
// completed its handshake with, echoing on the read loop; lastFlights
// counts the datagrams with a handshake record of epoch 1 (the server's
// Finished) that the client's socket has read since the handshake.
type lastFlightPair struct {
	client, server *Conn
	tap            *tappedPacketConn
	serverAddr     net.Addr
	lastFlights    atomic.Int64
}

func newLastFlightPair(t *testing.T) *lastFlightPair {
	t.Helper()
	p := &lastFlightPair{}
	var counting atomic.Bool
	p.tap = &tappedPacketConn{drop: func(b []byte) bool {
		if counting.Load() && hasRecord(b, protocol.ContentTypeHandshake, 1) {
			p.lastFlights.Add(1)
		}

		return false
	}}
	p.client, p.server, p.serverAddr = epochZeroPair(t, nil, p.tap)
	if err := p.server.SetInlineReadHandler(func(b []byte, err error) {
		if err == nil {
			if _, err := p.server.Write(b); err != nil {
				t.Errorf("echo: %v", err)
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	p.roundTrip(t, "before")
	counting.Store(true)

	return p
}

// roundTrip has the server echo s: it handles the client's datagrams in
// order, so the echo comes after whatever it sent for those before.
func (p *lastFlightPair) roundTrip(t *testing.T, s string) {
	t.Helper()
	if _, err := p.client.Write([]byte(s)); err != nil {
		t.Fatalf("client write %q: %v", s, err)
	}
	buf := make([]byte, 64)
	_ = p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := p.client.Read(buf)
	if err != nil || string(buf[:n]) != s {
		t.Fatalf("echo of %q: %q, %v", s, buf[:n], err)
	}
}

// send sends a handshake record of epoch 1 holding body, sealed with the
// client's keys, from the client's socket, then a round trip.
func (p *lastFlightPair) send(t *testing.T, body []byte) {
	t.Helper()
	if _, err := p.tap.WriteTo(sealedRecord(t, p.client, protocol.ContentTypeHandshake, body), p.serverAddr); err != nil {
		t.Fatal(err)
	}
	p.roundTrip(t, "after")
}

// nextMessage is the server's next handshake message sequence number:
// the client's Finished was the one before it.
func (p *lastFlightPair) nextMessage() uint16 {
	p.server.procMu.Lock()
	defer p.server.procMu.Unlock()

	return p.server.fragmentBuffer.currentMessageSequenceNumber
}

// TestBastionLastFlightOnlyForFinished (patch (59)): after the handshake,
// the server sends its last flight again for the client's retransmitted
// Finished only, not for any other handshake record of epoch 1 (a message
// of the handshake sent again, a fragment of one to come); pion sent it
// for each, so that a peer with the session's keys had one datagram sent
// for each it sent.
func TestBastionLastFlightOnlyForFinished(t *testing.T) {
	p := newLastFlightPair(t)
	next := p.nextMessage()
	for _, tc := range []struct {
		name string
		body []byte
		want int64
	}{
		{"ClientKeyExchange sent again", handshakeFragment(handshake.TypeClientKeyExchange, next-2, 20, 0, 20), 0},
		{"ClientHello sent again", handshakeFragment(handshake.TypeClientHello, 0, 64, 0, 64), 0},
		{"fragment of a message to come", handshakeFragment(handshake.TypeClientKeyExchange, next, 2, 0, 1), 0},
		{"Finished sent again", handshakeFragment(handshake.TypeFinished, next-1, 12, 0, 12), 1},
		{"ClientKeyExchange after it", handshakeFragment(handshake.TypeClientKeyExchange, next-2, 20, 0, 20), 0},
		{"Finished again", handshakeFragment(handshake.TypeFinished, next-1, 12, 0, 12), 1},
	} {
		before := p.lastFlights.Load()
		p.send(t, tc.body)
		if got := p.lastFlights.Load() - before; got != tc.want {
			t.Errorf("%s: the server sent its last flight %d times, want %d", tc.name, got, tc.want)
		}
	}
	if p.server.isConnectionClosed() {
		t.Error("the server's connection was closed")
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patches (59) and (60) (third_party/README.md): once
// a server's handshake has completed, only the peer's retransmitted
// Finished has it send its last flight again, and fragments of handshake
// messages to come are dropped, not kept.

package dtls

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
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

// TestBastionNoFragmentsAfterHandshake (patch (60)): after a server's
// handshake, a handshake record with a fragment of a message to come is
// dropped and reported to OnFragmentDropped with its sender and size; the
// fragment buffer keeps nothing (a server renegotiates nothing, so no such
// message is legitimate; pion kept them, within the bound of (55)). The
// client's retransmitted Finished still has the server send its last
// flight again, and the session goes on.
func TestBastionNoFragmentsAfterHandshake(t *testing.T) {
	p := newLastFlightPair(t)
	var mu sync.Mutex
	var drops []netip.AddrPort
	var sizes []int
	p.server.procMu.Lock()
	p.server.handshakeConfig.onFragmentDropped = func(from netip.AddrPort, size int) {
		mu.Lock()
		defer mu.Unlock()
		drops = append(drops, from)
		sizes = append(sizes, size)
	}
	p.server.procMu.Unlock()
	next := p.nextMessage()
	bodies := [][]byte{
		handshakeFragment(handshake.TypeClientKeyExchange, next, 2, 0, 1),
		handshakeFragment(handshake.TypeClientKeyExchange, next+1, 4000, 1000, 1000),
		handshakeFragment(handshake.TypeClientHello, next+2, 64, 0, 64), // a whole message
		// A Finished sent again, then a fragment to come, in one record.
		append(handshakeFragment(handshake.TypeFinished, next-1, 12, 0, 12),
			handshakeFragment(handshake.TypeClientKeyExchange, next+3, 2, 0, 1)...),
	}
	for _, b := range bodies {
		p.send(t, b)
	}
	p.server.procMu.Lock()
	kept, held := len(p.server.fragmentBuffer.cache), p.server.fragmentBuffer.held()
	p.server.procMu.Unlock()
	if kept != 0 || held != 0 {
		t.Errorf("the fragment buffer keeps %d messages, %d bytes; want none", kept, held)
	}
	client := netip.MustParseAddrPort(p.tap.LocalAddr().String())
	mu.Lock()
	if len(drops) != len(bodies) {
		t.Errorf("OnFragmentDropped told of %d records, want %d", len(drops), len(bodies))
	}
	for i, from := range drops {
		if from != client {
			t.Errorf("OnFragmentDropped told of a record from %v, want the client's %v", from, client)
		}
		// The record as opened: its header and the body.
		if i < len(bodies) && sizes[i] != recordlayer.FixedHeaderSize+len(bodies[i]) {
			t.Errorf("OnFragmentDropped told of a record of %d bytes, want %d", sizes[i], recordlayer.FixedHeaderSize+len(bodies[i]))
		}
	}
	mu.Unlock()
	before := p.lastFlights.Load()
	p.send(t, handshakeFragment(handshake.TypeFinished, next-1, 12, 0, 12))
	if got := p.lastFlights.Load() - before; got != 1 {
		t.Errorf("the client's Finished sent again: the server sent its last flight %d times, want 1", got)
	}
	if p.server.isConnectionClosed() {
		t.Error("the server's connection was closed")
	}
}

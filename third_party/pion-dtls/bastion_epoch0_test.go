// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (53) (third_party/README.md): once the
// handshake has completed, records of the plaintext epoch 0, which any
// host can forge with the peer's address, are dropped without a word.

package dtls

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// tappedPacketConn is a client's socket that notes the content type and
// epoch of every record it reads other than application data, from the
// moment watch is called.
type tappedPacketConn struct {
	*net.UDPConn
	// drop, if set, is shown each datagram read; one it returns true for
	// never reaches the client.
	drop func(b []byte) bool
	// wrote, if set, is shown each datagram the client writes.
	wrote func(b []byte)

	mu       sync.Mutex
	watching bool
	seen     []string
}

func (c *tappedPacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, a, err := c.UDPConn.ReadFrom(b)
		if err != nil {
			return n, a, err
		}
		if c.drop != nil && c.drop(b[:n]) {
			continue
		}
		c.note(b[:n])

		return n, a, err
	}
}

func (c *tappedPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	if c.wrote != nil {
		c.wrote(b)
	}

	return c.UDPConn.WriteTo(b, addr)
}

func (c *tappedPacketConn) note(b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.watching {
		return
	}
	pkts, err := recordlayer.UnpackDatagram(b)
	if err != nil {
		c.seen = append(c.seen, fmt.Sprintf("malformed datagram: %v", err))

		return
	}
	for _, p := range pkts {
		if t := protocol.ContentType(p[0]); t != protocol.ContentTypeApplicationData {
			c.seen = append(c.seen, fmt.Sprintf("type %d (epoch %d)", t, binary.BigEndian.Uint16(p[3:])))
		}
	}
}

func (c *tappedPacketConn) watch() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.watching = true
}

func (c *tappedPacketConn) snapshot() []string {
	c.mu.Lock()
	defer c.mu.Unlock()

	return append([]string(nil), c.seen...)
}

// epochZeroPair is a client connected straight to a listener's
// connection, whose socket (tap) can also send the server datagrams that
// never went through the client's DTLS state, from the client's address.
// clientCfg and tap's hooks may be nil.
func epochZeroPair(t *testing.T, clientCfg *Config, tap *tappedPacketConn) (client, server *Conn, serverAddr net.Addr) {
	t.Helper()
	if clientCfg == nil {
		clientCfg = bastionPSKConfig()
	}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionPSKConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srvc := make(chan *Conn, 1)
	srvErr := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			srvErr <- err

			return
		}
		c := nc.(*Conn) //nolint:forcetypeassert
		if err := c.HandshakeContext(ctx); err != nil {
			srvErr <- err

			return
		}
		srvc <- c
	}()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tap.UDPConn = pc
	client, err = Client(tap, ln.Addr(), clientCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if err := client.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	select {
	case server = <-srvc:
	case err := <-srvErr:
		t.Fatalf("server handshake: %v", err)
	}
	t.Cleanup(func() { _ = server.Close() })

	return client, server, ln.Addr()
}

// plaintextRecord is a record of epoch 0 with sequence number seq.
func plaintextRecord(t *testing.T, typ protocol.ContentType, seq uint64, body []byte) []byte {
	t.Helper()
	h := recordlayer.Header{
		ContentType:    typ,
		Version:        protocol.Version1_2,
		SequenceNumber: seq,
		ContentLen:     uint16(len(body)), //nolint:gosec // G115: test bodies are small.
	}
	b, err := h.Marshal()
	if err != nil {
		t.Fatal(err)
	}

	return append(b, body...)
}

// handshakeFragment is a fragment of n bytes at off of a handshake message
// of type typ, length length and message sequence number msgSeq.
func handshakeFragment(typ handshake.Type, msgSeq uint16, length, off, n uint32) []byte {
	h := handshake.Header{
		Type: typ, Length: length, MessageSequence: msgSeq, FragmentOffset: off, FragmentLength: n,
	}
	b, _ := h.Marshal()

	return append(b, make([]byte, n)...)
}

// TestBastionEpochZeroAfterHandshake: after the handshake, datagrams of
// epoch 0 records sent from the client's address (anyone on the path can
// send them) change nothing: no alert reaches the client (pion answered
// application data with a fatal unexpected_message and a ChangeCipherSpec
// with a bad body with a fatal decode_error, both encrypted, which ended
// the client's session while the server's lived on), no handshake
// fragment is kept (pion kept those of a message sequence number at or
// past the next one, for the connection's life), the server's last flight
// is not sent again (pion sent it for every handshake record), no record
// reader starts for them on a connection whose read handler is inline
// (patch (22)), the read handler gets no error, and application data goes
// both ways as before.
func TestBastionEpochZeroAfterHandshake(t *testing.T) {
	cases := []struct {
		name string
		// datagrams returns the datagrams to send; seq is the first record
		// sequence number to use, past those of the client's handshake, so
		// that pion's replay window lets them through; next is the server's
		// next handshake message sequence number.
		datagrams func(t *testing.T, seq uint64, next uint16) [][]byte
	}{
		{"application data", func(t *testing.T, seq uint64, _ uint16) [][]byte {
			var out [][]byte
			for i := range 3 {
				out = append(out, plaintextRecord(t, protocol.ContentTypeApplicationData, seq+uint64(i), []byte("x")))
			}

			return out
		}},
		{"change cipher spec with a bad body", func(t *testing.T, seq uint64, _ uint16) [][]byte {
			return [][]byte{
				plaintextRecord(t, protocol.ContentTypeChangeCipherSpec, seq, []byte{2}),
				plaintextRecord(t, protocol.ContentTypeChangeCipherSpec, seq+1, []byte{1, 1}),
			}
		}},
		{"handshake fragments", func(t *testing.T, seq uint64, next uint16) [][]byte {
			var out [][]byte
			// A whole ClientHello-sized message of the past (what pion
			// took for a retransmission), then fragments of messages to
			// come, 512 bytes each, none covering another.
			out = append(out, plaintextRecord(t, protocol.ContentTypeHandshake, seq,
				handshakeFragment(handshake.TypeClientHello, 0, 64, 0, 64)))
			for i := range 60 {
				frag := handshakeFragment(handshake.TypeClientKeyExchange, next+uint16(i%3), //nolint:gosec // G115
					1<<20, uint32(i)*1024, 512) //nolint:gosec // G115
				out = append(out, plaintextRecord(t, protocol.ContentTypeHandshake, seq+1+uint64(i), frag))
			}

			return out
		}},
	}
	for _, tc := range cases {
		for _, inline := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/inline=%v", tc.name, inline), func(t *testing.T) {
				waitFor(t, "the record readers of earlier tests to end", func() bool { return recordReaders() == 0 })
				tap := &tappedPacketConn{}
				client, server, serverAddr := epochZeroPair(t, nil, tap)
				waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
				rec := newInlineRecorder(t)
				rec.onData = func(p []byte) {
					if _, err := server.Write(append([]byte("echo "), p...)); err != nil {
						t.Errorf("write from handler: %v", err)
					}
				}
				set := server.SetReadHandler
				if inline {
					set = server.SetInlineReadHandler
				}
				if err := set(rec.handle); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 64)
				roundTrip := func(s string) {
					t.Helper()
					if _, err := client.Write([]byte(s)); err != nil {
						t.Fatalf("client write %q: %v", s, err)
					}
					_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
					n, err := client.Read(buf)
					if err != nil {
						t.Fatalf("client read of the echo of %q: %v; records other than application data the client read: %v",
							s, err, tap.snapshot())
					}
					if string(buf[:n]) != "echo "+s {
						t.Fatalf("echo: got %q, want %q", buf[:n], "echo "+s)
					}
				}
				roundTrip("before")
				tap.watch()

				server.procMu.Lock()
				next := server.fragmentBuffer.currentMessageSequenceNumber
				server.procMu.Unlock()
				datagrams := tc.datagrams(t, 1000, next)
				// In bursts, each followed by a round trip: the server
				// handles a peer's datagrams in order, so the echo comes
				// after whatever it sent for the burst, and no burst
				// outruns the sockets' buffers.
				for i := 0; i < len(datagrams); i += 10 {
					for _, d := range datagrams[i:min(i+10, len(datagrams))] {
						if _, err := tap.WriteTo(d, serverAddr); err != nil {
							t.Fatalf("send from the client's socket: %v (closed when the client ended its session); "+
								"records other than application data the client read: %v", err, tap.snapshot())
						}
					}
					roundTrip(fmt.Sprintf("after %d", i))
				}

				if seen := tap.snapshot(); len(seen) != 0 {
					t.Errorf("the client read %d records other than application data after the epoch 0 records (the first: %v), want none",
						len(seen), seen[:min(len(seen), 4)])
				}
				server.procMu.Lock()
				kept, size := len(server.fragmentBuffer.cache), server.fragmentBuffer.size()
				server.procMu.Unlock()
				if kept != 0 || size != 0 {
					t.Errorf("fragment buffer holds %d messages, %d bytes; want none", kept, size)
				}
				if _, _, errs := rec.snapshot(); len(errs) != 0 {
					t.Errorf("read handler errors %v, want none", errs)
				}
				if inline {
					if n := recordReaders(); n != 1 {
						t.Errorf("%d record readers, want 1 (the client's)", n)
					}
				}
				if server.isConnectionClosed() {
					t.Error("the server's connection was closed")
				}
				// The server writes too, unprompted.
				if _, err := server.Write([]byte("push")); err != nil {
					t.Fatal(err)
				}
				_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := client.Read(buf); err != nil || string(buf[:n]) != "push" {
					t.Fatalf("client read: %q, %v; want \"push\"", buf[:n], err)
				}
			})
		}
	}
}

// hasRecord reports whether datagram b holds a record of type typ in epoch.
func hasRecord(b []byte, typ protocol.ContentType, epoch uint16) bool {
	pkts, err := recordlayer.UnpackDatagram(b)
	if err != nil {
		return false
	}
	for _, p := range pkts {
		if protocol.ContentType(p[0]) == typ && binary.BigEndian.Uint16(p[3:]) == epoch {
			return true
		}
	}

	return false
}

// TestBastionEpochZeroLastFlightRetransmitted: the server's last flight
// (ChangeCipherSpec, Finished) is lost; the client sends its own last
// flight again, whose epoch 0 records (its ClientKeyExchange and
// ChangeCipherSpec) come in datagrams of their own before its Finished,
// in epoch 1. The server, whose handshake has completed, drops the epoch
// 0 records and answers each Finished, and only those, with its last
// flight: the client completes, and the server sent the flight again
// exactly as often as it got the client's Finished again (pion sent it
// for the ClientKeyExchange too).
func TestBastionEpochZeroLastFlightRetransmitted(t *testing.T) {
	var mu sync.Mutex
	var clientFinished, serverFinished, dropped int
	tap := &tappedPacketConn{
		drop: func(b []byte) bool {
			if !hasRecord(b, protocol.ContentTypeHandshake, 1) {
				return false
			}
			mu.Lock()
			defer mu.Unlock()
			if dropped == 0 {
				dropped++

				return true
			}
			serverFinished++

			return false
		},
		wrote: func(b []byte) {
			if hasRecord(b, protocol.ContentTypeHandshake, 1) {
				mu.Lock()
				clientFinished++
				mu.Unlock()
			}
		},
	}
	cfg := bastionPSKConfig()
	cfg.MTU = 40 // one record per datagram
	client, server, _ := epochZeroPair(t, cfg, tap)
	if err := server.SetInlineReadHandler(func(p []byte, err error) {
		if err == nil {
			if _, err := server.Write(p); err != nil {
				t.Errorf("echo: %v", err)
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	// The server handles the client's datagrams in order: the echo comes
	// after every flight it sent for the client's retransmissions.
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(buf); err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("echo: %q, %v", buf[:n], err)
	}
	mu.Lock()
	defer mu.Unlock()
	if dropped != 1 || clientFinished < 2 {
		t.Fatalf("server's last flight dropped %d times, client's Finished sent %d times; want 1, at least 2",
			dropped, clientFinished)
	}
	if serverFinished != clientFinished-1 {
		t.Errorf("server sent its last flight again %d times for %d retransmissions of the client's Finished, want as many",
			serverFinished, clientFinished-1)
	}
}

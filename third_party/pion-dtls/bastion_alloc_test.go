// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, (8)): application
// data records of an established connection are sealed in place and read
// in place, with the bytes and the behaviour of pion's generic path.

package dtls

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

var bastionInPlaceSuites = []CipherSuiteID{
	TLS_PSK_WITH_AES_128_CCM_8,
	TLS_PSK_WITH_AES_128_GCM_SHA256,
	TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
	TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
}

// TestBastionInPlaceSealMatchesGeneric checks that the in-place path
// (sealApplicationData) writes exactly the bytes of the generic path
// (processPacket) and takes the same sequence numbers, for AES-CCM-8 and
// AES-GCM, with and without a connection ID; and that the peer's cipher
// opens them to the payload.
func TestBastionInPlaceSealMatchesGeneric(t *testing.T) {
	master := bytes.Repeat([]byte{0x42}, 48)
	clientRandom := bytes.Repeat([]byte{0x01}, 32)
	serverRandom := bytes.Repeat([]byte{0x02}, 32)
	for _, id := range bastionInPlaceSuites {
		for _, cid := range [][]byte{nil, {1, 2, 3, 4, 5, 6, 7, 8}, {9}} {
			for _, size := range []int{0, 1, 13, 100, 1152, maxInPlacePayload} {
				for _, seq := range []uint64{0, 1, 1<<40 + 7, recordlayer.MaxSequenceNumber - 1} {
					name := fmt.Sprintf("%v/cid=%x/len=%d/seq=%d", id, cid, size, seq)
					payload := make([]byte, size)
					for i := range payload {
						payload[i] = byte(i*7 + size)
					}
					server := cipherSuiteForID(id, nil)
					if err := server.Init(master, clientRandom, serverRandom, false); err != nil {
						t.Fatal(err)
					}
					c := &Conn{}
					c.state.cipherSuite = server
					c.state.remoteConnectionID = cid

					c.state.localSequenceNumber = []uint64{0, seq}
					want, err := c.processPacket(&packet{
						record: &recordlayer.RecordLayer{
							Header:  recordlayer.Header{Epoch: 1, Version: protocol.Version1_2},
							Content: &protocol.ApplicationData{Data: payload},
						},
						shouldWrapCID: len(cid) > 0,
						shouldEncrypt: true,
					})
					if err != nil {
						t.Fatalf("%s: generic: %v", name, err)
					}
					wantNext := c.state.localSequenceNumber[1]

					c.state.localSequenceNumber = []uint64{0, seq}
					got, done, err := c.sealApplicationData(make([]byte, 0, 64+size), 1, payload)
					if err != nil || !done {
						t.Fatalf("%s: in place: done=%v err=%v", name, done, err)
					}
					if !bytes.Equal(want, got) {
						t.Fatalf("%s: in-place record differs (-want +got):\n-%s\n+%s", name, hex.EncodeToString(want), hex.EncodeToString(got))
					}
					if next := c.state.localSequenceNumber[1]; next != wantNext {
						t.Fatalf("%s: next sequence number %d, want %d", name, next, wantNext)
					}

					client := cipherSuiteForID(id, nil)
					if err := client.Init(master, clientRandom, serverRandom, true); err != nil {
						t.Fatal(err)
					}
					var hdr recordlayer.Header
					if len(cid) > 0 {
						hdr.ConnectionID = make([]byte, len(cid))
					}
					plain, err := client.Decrypt(hdr, append([]byte(nil), got...))
					if err != nil {
						t.Fatalf("%s: peer cannot open the record: %v", name, err)
					}
					h := recordlayer.Header{ConnectionID: hdr.ConnectionID}
					if err := h.Unmarshal(plain); err != nil {
						t.Fatal(err)
					}
					content := plain[recordlayer.FixedHeaderSize:]
					if len(cid) > 0 {
						var ip recordlayer.InnerPlaintext
						if err := ip.Unmarshal(plain[h.Size():]); err != nil || ip.RealType != protocol.ContentTypeApplicationData {
							t.Fatalf("%s: inner plaintext %+v: %v", name, ip, err)
						}
						content = ip.Content
					}
					if !bytes.Equal(content, payload) {
						t.Fatalf("%s: peer opened %x, want %x", name, content, payload)
					}
				}
			}
		}
	}
}

// TestBastionInPlaceSealOverflow: the in-place path refuses the sequence
// number after the last, as processPacket does.
func TestBastionInPlaceSealOverflow(t *testing.T) {
	cs := cipherSuiteForID(TLS_PSK_WITH_AES_128_CCM_8, nil)
	if err := cs.Init(make([]byte, 48), make([]byte, 32), make([]byte, 32), false); err != nil {
		t.Fatal(err)
	}
	c := &Conn{}
	c.state.cipherSuite = cs
	c.state.localSequenceNumber = []uint64{0, recordlayer.MaxSequenceNumber + 1}
	if _, _, err := c.sealApplicationData(nil, 1, []byte("x")); err != errSequenceNumberOverflow { //nolint:errorlint
		t.Fatalf("sealApplicationData after the last sequence number: %v, want %v", err, errSequenceNumberOverflow)
	}
}

// gatedPacketConn drops everything it reads once gated, and then blocks
// its reader until closed, so the peer does no work during a measurement.
type gatedPacketConn struct {
	*net.UDPConn
	gated   atomic.Bool
	release chan struct{}
}

func (g *gatedPacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := g.UDPConn.ReadFrom(b)
	if g.gated.Load() {
		<-g.release

		return 0, nil, net.ErrClosed
	}

	return n, a, err
}

func (g *gatedPacketConn) Close() error {
	if g.gated.CompareAndSwap(true, false) {
		close(g.release)
	}

	return g.UDPConn.Close()
}

// bastionDirectPair is a client connected straight to a listener's
// connection (no proxy), with the given suite and connection IDs.
func bastionDirectPair(t *testing.T, suite CipherSuiteID, cid bool) (client, server *Conn, gate *gatedPacketConn) {
	t.Helper()
	cfg := func() *Config {
		c := bastionPSKConfig()
		c.CipherSuites = []CipherSuiteID{suite}
		if cid {
			c.ConnectionIDGenerator = RandomCIDGenerator(8)
		}

		return c
	}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, cfg())
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
	gate = &gatedPacketConn{UDPConn: pc, release: make(chan struct{})}
	client, err = Client(gate, ln.Addr(), cfg())
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
	if cid && (len(server.state.remoteConnectionID) == 0 || len(server.state.getLocalConnectionID()) == 0) {
		t.Fatal("no connection IDs were negotiated")
	}

	return client, server, gate
}

// TestBastionWriteAllocs: a listener connection's Write of an application
// data record allocates nothing with AES-GCM and one object with AES-CCM
// (pion's generic path: 10 or more objects).
func TestBastionWriteAllocs(t *testing.T) {
	for _, suite := range []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256} {
		for _, cid := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v/cid=%v", suite, cid), func(t *testing.T) {
				_, server, gate := bastionDirectPair(t, suite, cid)
				gate.gated.Store(true) // the client reads no more
				payload := bytes.Repeat([]byte("p"), 100)
				allocs := testing.AllocsPerRun(200, func() {
					if _, err := server.Write(payload); err != nil {
						t.Fatal(err)
					}
				})
				t.Logf("Write: %.1f allocations per record", allocs)
				want := 0.0
				if suite == TLS_PSK_WITH_AES_128_CCM_8 {
					want = 1 // the key stream of cipher.NewCTR in package ccm
				}
				if allocs > want {
					t.Fatalf("Write allocates %.1f objects per record, want <= %.0f", allocs, want)
				}
			})
		}
	}
}

// TestBastionReadAllocs: a record that reaches a listener and is handed
// to its connection's read handler costs the server at most 3 allocations
// (the listener's: the *net.UDPAddr ReadFrom makes, the map key and the
// wait of the connection's packet buffer); pion's generic path made 13 or
// more. The client seals the records (as Write does) and sends them from
// its socket itself, so that only the server's work is counted.
func TestBastionReadAllocs(t *testing.T) {
	for _, suite := range []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256} {
		for _, cid := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v/cid=%v", suite, cid), func(t *testing.T) {
				client, server, gate := bastionDirectPair(t, suite, cid)
				payload := bytes.Repeat([]byte("q"), 100)
				got := make(chan int, 1)
				var bad atomic.Bool
				if err := server.SetReadHandler(func(p []byte, err error) {
					if err != nil {
						return
					}
					if !bytes.Equal(p, payload) {
						bad.Store(true)
					}
					got <- len(p)
				}); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 0, 2048)
				epoch := client.state.getLocalEpoch()
				to := client.RemoteAddr()
				allocs := testing.AllocsPerRun(200, func() {
					client.lock.Lock()
					raw, done, err := client.sealApplicationData(buf[:0], epoch, payload)
					client.lock.Unlock()
					if err != nil || !done {
						t.Fatalf("seal: done=%v err=%v", done, err)
					}
					if _, err := gate.UDPConn.WriteTo(raw, to); err != nil {
						t.Fatal(err)
					}
					<-got
				})
				if bad.Load() {
					t.Fatal("the handler got other bytes than were written")
				}
				t.Logf("server read: %.1f allocations per record", allocs)
				if allocs > 3 {
					t.Fatalf("the server allocates %.1f objects per record read, want <= 3", allocs)
				}
			})
		}
	}
}

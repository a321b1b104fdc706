// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Allocation tests of the Bastion patch (third_party/README.md, (7)):
// the application data paths of an established listener connection. They
// use only what the unpatched release has too, so they can be run
// against it (where they fail).

package dtls

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

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

// TestBastionWriteAllocs: a listener connection's Write of a 100-byte
// application data record allocates nothing (pion's generic path: 10 to
// 20 objects).
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
				if allocs > 0 {
					t.Fatalf("Write allocates %.1f objects per record, want 0", allocs)
				}
			})
		}
	}
}

// TestBastionReadAllocs: a record that reaches a listener and is handed
// to its connection's read handler costs the server no allocation, one
// with a connection ID (the listener's routing key, string(cid)); pion's
// path made 18 to 29.
// The client's records go out from its socket directly, so that only the
// server's work is counted.
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
				// The records are sealed before the measurement, so that only
				// the server's work is counted.
				const runs = 200
				records := make([][]byte, 0, runs+1)
				client.lock.Lock()
				for range runs + 1 {
					raw, err := client.processPacket(&packet{
						record: &recordlayer.RecordLayer{
							Header:  recordlayer.Header{Epoch: client.state.getLocalEpoch(), Version: protocol.Version1_2},
							Content: &protocol.ApplicationData{Data: payload},
						},
						shouldWrapCID: len(client.state.remoteConnectionID) > 0,
						shouldEncrypt: true,
					})
					if err != nil {
						t.Fatal(err)
					}
					records = append(records, raw)
				}
				client.lock.Unlock()
				to := client.RemoteAddr()
				next := 0
				allocs := testing.AllocsPerRun(runs, func() {
					if _, err := gate.UDPConn.WriteTo(records[next], to); err != nil {
						t.Fatal(err)
					}
					next++
					<-got
				})
				if bad.Load() {
					t.Fatal("the handler got other bytes than were written")
				}
				t.Logf("server read: %.1f allocations per record", allocs)
				want := 0.0
				if cid {
					want++ // the listener's routing key, string(connection ID)
				}
				if allocs > want {
					t.Fatalf("the server allocates %.1f objects per record read, want <= %.0f", allocs, want)
				}
			})
		}
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// TestBastionQueueBound (patch (56)): datagrams for a connection whose
// reader does not read wait in its queue up to queueMaxPackets datagrams
// and queueMaxBytes bytes; the read loop drops the ones past that and
// tells ListenConfig.ReadDropped of each, with its sender and size (pion
// queued them all). The reader then gets the ones queued, first to last.
func TestBastionQueueBound(t *testing.T) {
	for _, tc := range []struct {
		name       string
		size, sent int
		want       int // queued
	}{
		{"1,000-byte datagrams", 1000, 300, queueMaxBytes / 1000},
		{"8-byte datagrams", 8, 300, queueMaxPackets},
	} {
		t.Run(tc.name, func(t *testing.T) {
			type drop struct {
				from netip.AddrPort
				size int
			}
			var mu sync.Mutex
			var dropped []drop
			// handled gets a token for each datagram queued or dropped.
			handled := make(chan struct{}, tc.sent)
			lc := ListenConfig{ReadDropped: func(from netip.AddrPort, size int) {
				mu.Lock()
				dropped = append(dropped, drop{from, size})
				mu.Unlock()
				handled <- struct{}{}
			}}
			ln, err := lc.Listen("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = ln.Close() }()
			dc, err := net.DialUDP("udp4", nil, ln.Addr().(*net.UDPAddr)) //nolint:forcetypeassert
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = dc.Close() }()
			datagram := func(i int) []byte {
				b := make([]byte, tc.size)
				binary.BigEndian.PutUint32(b, uint32(i)) //nolint:gosec // G115
				return b
			}
			if _, err := dc.Write(datagram(0)); err != nil {
				t.Fatal(err)
			}
			pc, _, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = pc.Close() }()
			conn := pc.(*PacketConn) //nolint:forcetypeassert
			conn.SetOnQueue(func() { handled <- struct{}{} })
			// In bursts, each waited for until the read loop has queued
			// or dropped every datagram of it, so that no burst outruns
			// the socket's buffer.
			for sent := 1; sent < tc.sent; {
				burst := min(20, tc.sent-sent)
				for range burst {
					if _, err := dc.Write(datagram(sent)); err != nil {
						t.Fatal(err)
					}
					sent++
				}
				for range burst {
					select {
					case <-handled:
					case <-time.After(5 * time.Second):
						t.Fatalf("%d datagrams sent, the read loop handled fewer", sent)
					}
				}
			}
			packets, bytes := conn.buffer.Len()
			if packets != tc.want || bytes > queueMaxBytes {
				t.Errorf("%d datagrams (%d bytes) queued, want %d (at most %d bytes)", packets, bytes, tc.want, queueMaxBytes)
			}
			mu.Lock()
			if len(dropped) != tc.sent-tc.want {
				t.Errorf("ReadDropped told of %d datagrams, want %d", len(dropped), tc.sent-tc.want)
			} else if want := (drop{netip.MustParseAddrPort(dc.LocalAddr().String()), tc.size}); dropped[0] != want {
				t.Errorf("ReadDropped told of %v, want %v", dropped[0], want)
			}
			mu.Unlock()
			b := make([]byte, receiveMTU)
			for i := range packets {
				n, _, err := conn.ReadFrom(b)
				if err != nil || n != tc.size || binary.BigEndian.Uint32(b) != uint32(i) { //nolint:gosec // G115
					t.Fatalf("read %d: %d bytes, datagram %d, %v; want %d bytes, datagram %d", i, n, binary.BigEndian.Uint32(b), err, tc.size, i)
				}
			}
		})
	}
}

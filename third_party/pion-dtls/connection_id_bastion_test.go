// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// upstreamCIDDatagramRouter is pion's cidDatagramRouter before the Bastion
// patch, the reference for the in-place one.
func upstreamCIDDatagramRouter(size int) func([]byte) (string, bool) {
	return func(packet []byte) (string, bool) {
		pkts, err := recordlayer.ContentAwareUnpackDatagram(packet, size)
		if err != nil || len(pkts) < 1 {
			return "", false
		}
		for _, pkt := range pkts {
			h := &recordlayer.Header{
				ConnectionID: make([]byte, size),
			}
			if err := h.Unmarshal(pkt); err != nil {
				continue
			}
			if h.ContentType != protocol.ContentTypeConnectionID {
				continue
			}

			return string(h.ConnectionID), true
		}

		return "", false
	}
}

func cidRouterSeeds() [][]byte {
	rec := func(typ byte, version [2]byte, cid []byte, body ...byte) []byte {
		b := []byte{typ, version[0], version[1], 0, 1, 0, 0, 0, 0, 0, 7}
		b = append(b, cid...)

		return append(b, append([]byte{0, byte(len(body))}, body...)...)
	}
	v12, v10, bad := [2]byte{0xfe, 0xfd}, [2]byte{0xfe, 0xff}, [2]byte{3, 3}
	cid := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	handshake := rec(22, v12, nil, 1, 2, 3)
	withCID := rec(25, v12, cid, 9, 9)

	return [][]byte{
		nil,
		handshake,
		withCID,
		rec(25, v10, cid),
		rec(25, bad, cid, 1),
		append(append([]byte{}, handshake...), withCID...),
		append(rec(25, bad, cid, 1), rec(25, v12, []byte{8, 7, 6, 5, 4, 3, 2, 1})...),
		append(append([]byte{}, withCID...), 23),
		withCID[:len(withCID)-1],
		withCID[:12],
		rec(25, v12, cid[:4]),
		{25},
	}
}

// TestCIDDatagramRouterMatchesUpstream: the in-place router answers as
// pion's did, for well-formed, truncated and mixed datagrams.
func TestCIDDatagramRouterMatchesUpstream(t *testing.T) {
	for _, size := range []int{0, 4, 8} {
		got, want := cidDatagramRouter(size), upstreamCIDDatagramRouter(size)
		for i, p := range cidRouterSeeds() {
			g, gok := got(p)
			w, wok := want(p)
			if g != w || gok != wok {
				t.Errorf("size %d, datagram %d %x: got %q %v, want %q %v", size, i, p, g, gok, w, wok)
			}
		}
	}
}

func FuzzCIDDatagramRouter(f *testing.F) {
	for _, p := range cidRouterSeeds() {
		f.Add(p, uint8(8))
	}
	f.Fuzz(func(t *testing.T, p []byte, size uint8) {
		n := int(size % 17)
		g, gok := cidDatagramRouter(n)(p)
		w, wok := upstreamCIDDatagramRouter(n)(p)
		if g != w || gok != wok {
			t.Fatalf("size %d, datagram %x: got %q %v, want %q %v", n, p, g, gok, w, wok)
		}
	})
}

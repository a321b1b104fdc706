// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"testing"

	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// TestBastionHandshakeCacheInline (patch (24)): a handshake's messages go
// into the cache with no allocation each, later ones still go in, and
// pullOne answers as pull does.
func TestBastionHandshakeCacheInline(t *testing.T) {
	types := []handshake.Type{
		handshake.TypeClientHello, handshake.TypeServerHello, handshake.TypeServerHelloDone,
		handshake.TypeClientKeyExchange, handshake.TypeFinished,
	}
	data := []byte("message")
	allocs := testing.AllocsPerRun(20, func() {
		h := newHandshakeCache()
		for i := range handshakeCacheInline {
			_ = h.pushOwned(data, 0, uint16(i), types[i%len(types)], i%2 == 0) //nolint:gosec
		}
	})
	if allocs > 1 { // the cache itself
		t.Errorf("%d messages into a new cache: %.0f allocations, want 1", handshakeCacheInline, allocs)
	}
	h := newHandshakeCache()
	for i := range 3 * handshakeCacheInline {
		if err := h.pushOwned(data, uint16(i%3), uint16(i), types[i%len(types)], i%2 == 0); err != nil { //nolint:gosec
			t.Fatal(err)
		}
	}
	if len(h.cache) != 3*handshakeCacheInline {
		t.Fatalf("cache holds %d items, want %d", len(h.cache), 3*handshakeCacheInline)
	}
	for i, c := range h.cache {
		if int(c.messageSequence) != i {
			t.Fatalf("item %d has sequence %d", i, c.messageSequence)
		}
	}
	for _, typ := range types {
		for epoch := range uint16(4) {
			for _, isClient := range []bool{false, true} {
				r := handshakeCachePullRule{typ: typ, epoch: epoch, isClient: isClient}
				if got, want := h.pullOne(r), h.pull(r)[0]; got != want {
					t.Errorf("pullOne(%+v) = %v, pull = %v", r, got, want)
				}
			}
		}
	}
}

// TestBastionClientHelloRetransmitWhole (patch (43)): a ClientHello copy
// that comes whole completes at once, also after a pending partial copy,
// which it clears, without allocating; fragments are still put together.
func TestBastionClientHelloRetransmitWhole(t *testing.T) {
	const length = 60
	whole := handshakeRecordBytes(0, handshake.TypeClientHello, 1, length, [2]int{0, length})
	first := handshakeRecordBytes(0, handshake.TypeClientHello, 1, length, [2]int{0, 20})
	last := handshakeRecordBytes(0, handshake.TypeClientHello, 1, length, [2]int{20, length})
	h := newHandshakeCache()
	if err := h.push(whole[recordlayer.FixedHeaderSize:], 0, 1, handshake.TypeClientHello, true); err != nil {
		t.Fatal(err)
	}
	for i, step := range []struct {
		packet  []byte
		want    bool
		pending bool
	}{
		{first, false, true},
		{whole, true, false},
		{first, false, true},
		{last, true, false},
		{whole, true, false},
	} {
		if got := h.isClientHelloRetransmit(step.packet); got != step.want || (h.clientHelloRetransmit != nil) != step.pending {
			t.Fatalf("step %d: retransmit %v, pending %v; want %v, %v", i, got, h.clientHelloRetransmit != nil, step.want, step.pending)
		}
	}
	if n := testing.AllocsPerRun(20, func() {
		if !h.isClientHelloRetransmit(whole) {
			t.Fatal("whole copy not recognised")
		}
	}); n != 0 {
		t.Errorf("a whole ClientHello copy: %v allocations, want 0", n)
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package net

import (
	"errors"
	"net"
	"testing"
)

// slotRoom is the room every slot of b keeps, counted from the slots.
func slotRoom(b *PacketBuffer) int {
	b.mutex.Lock()
	defer b.mutex.Unlock()
	n := 0
	for i := range b.packets {
		n += b.packets[i].data.Cap()
	}

	return n
}

// TestBastionBoundedPacketBuffer (patch (56)): a bounded buffer takes
// packets up to its count and its bytes, refuses the next with ErrFull
// (pion's grew without bound), hands out what it took in order, and once
// they are read its slots keep at most keepBytes of room, even after each
// slot has held a packet of 8,000 bytes (pion's kept each slot's room).
func TestBastionBoundedPacketBuffer(t *testing.T) {
	const maxPackets, maxBytes = 128, 64 << 10
	addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	b := NewBoundedPacketBuffer(maxPackets, maxBytes)
	out := make([]byte, maxBytes)
	fill := func(size int) int {
		t.Helper()
		for i := range 1000 {
			p := make([]byte, size)
			p[0] = byte(i)
			if _, err := b.WriteTo(p, addr); errors.Is(err, ErrFull) {
				return i
			} else if err != nil {
				t.Fatal(err)
			}
		}
		t.Fatalf("1000 packets of %d bytes taken, want a bound", size)

		return 0
	}
	drain := func(first, n, size int) {
		t.Helper()
		for i := first; i < first+n; i++ {
			m, _, err := b.ReadFrom(out)
			if err != nil || m != size || out[0] != byte(i) {
				t.Fatalf("read %d: %d bytes starting %d, %v; want %d bytes starting %d", i, m, out[0], err, size, byte(i))
			}
		}
		if p, q := b.Len(); p != 0 || q != 0 {
			t.Fatalf("after reading everything: %d packets, %d bytes queued", p, q)
		}
	}
	for _, tc := range []struct{ size, want int }{
		{1, maxPackets},         // the count binds
		{1000, maxBytes / 1000}, // the bytes bind
		{8000, maxBytes / 8000}, // a few of the largest
		{maxBytes, 1},           // an empty buffer takes any packet up to maxBytes
	} {
		got := fill(tc.size)
		if got != tc.want {
			t.Fatalf("packets of %d bytes: %d taken, want %d", tc.size, got, tc.want)
		}
		if p, q := b.Len(); p != got || q != got*tc.size {
			t.Fatalf("packets of %d bytes: Len() = %d, %d; want %d, %d", tc.size, p, q, got, got*tc.size)
		}
		drain(0, got, tc.size)
	}
	if room := slotRoom(b); room > keepBytes {
		t.Errorf("after the bursts the slots keep %d bytes of room, want at most %d", room, keepBytes)
	}
	// One packet at a time, around the ring (128 slots, grown by the
	// first burst): each slot would keep 8,000 bytes.
	for i := range 3 * maxPackets {
		p := make([]byte, 8000)
		p[0] = byte(i)
		if _, err := b.WriteTo(p, addr); err != nil {
			t.Fatal(err)
		}
		drain(i, 1, 8000)
		b.mutex.Lock()
		kept := b.kept
		b.mutex.Unlock()
		if room := slotRoom(b); room > keepBytes || room != kept {
			t.Fatalf("after packet %d the slots keep %d bytes of room (counted: %d), want at most %d", i, room, kept, keepBytes)
		}
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package net

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// TestBastionWakeEveryReader: with the Bastion patch a write wakes one
// waiting reader with a token instead of closing a channel for all; every
// packet must still reach a reader when several wait, a closed done ends
// only its own wait, and Close must still wake them all.
func TestBastionWakeEveryReader(t *testing.T) {
	addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	for round := range 200 {
		buf := NewPacketBuffer()
		const readers = 4
		got := make(chan error, readers)
		var wg sync.WaitGroup
		for range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b := make([]byte, 16)
				_, _, err := buf.ReadFrom(b)
				got <- err
			}()
		}
		done := make(chan struct{})
		doneErr := make(chan error, 1)
		go func() {
			_, _, err := buf.ReadFromDone(make([]byte, 16), done)
			doneErr <- err
		}()
		for i := range readers - 1 {
			if _, err := buf.WriteTo([]byte{byte(i)}, addr); err != nil {
				t.Fatal(err)
			}
		}
		for range readers - 1 {
			select {
			case err := <-got:
				if err != nil && !errors.Is(err, io.EOF) {
					t.Fatalf("round %d: read: %v", round, err)
				}
			case err := <-doneErr:
				if err != nil {
					t.Fatalf("round %d: read with done: %v", round, err)
				}
				done = nil // it took a packet; nothing left to end
			case <-time.After(5 * time.Second):
				t.Fatalf("round %d: a written packet woke no reader", round)
			}
		}
		if done != nil {
			close(done)
		}
		if err := buf.Close(); err != nil {
			t.Fatal(err)
		}
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		select {
		case <-finished:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Close did not wake every reader", round)
		}
	}
}

// TestBastionSlotSizedToPacket (patch (42)): a slot too small for a packet
// gets a buffer of the packet's size, not twice its old one, and every
// packet reads back as written.
func TestBastionSlotSizedToPacket(t *testing.T) {
	b := NewPacketBuffer()
	defer func() { _ = b.Close() }()
	addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5684}
	largest := 0
	for i, size := range []int{150, 170, 90, 170, 400, 10} {
		pkt := bytes.Repeat([]byte{byte(i)}, size)
		if _, err := b.WriteTo(pkt, addr); err != nil {
			t.Fatal(err)
		}
		largest = max(largest, size)
		if got := b.packets[0].data.Cap(); got != largest {
			t.Fatalf("packet %d (%d bytes): slot capacity %d, want %d", i, size, got, largest)
		}
		out := make([]byte, 512)
		n, from, err := b.ReadFrom(out)
		if err != nil || !bytes.Equal(out[:n], pkt) || from != addr {
			t.Fatalf("packet %d: read %d bytes from %v (%v)", i, n, from, err)
		}
	}
}

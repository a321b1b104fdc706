// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

// Package net implements DTLS specific networking primitives.
// NOTE: this package is an adaption of pion/transport/packetio that allows for
// storing a remote address alongside each packet in the buffer and implements
// relevant methods of net.PacketConn. If possible, the updates made in this
// repository will be reflected back upstream. If not, it is likely that this
// will be moved to a public package in this repository.
//
// This package was migrated from pion/transport/packetio at
// https://github.com/pion/transport/commit/6890c795c807a617c054149eee40a69d7fdfbfdb
package net

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"github.com/pion/transport/v5/deadline"
)

// ErrTimeout indicates that deadline was reached before operation could be
// completed.
var ErrTimeout = errors.New("buffer: i/o timeout")

// ErrFull is returned by WriteTo on a bounded buffer that has no room for
// the packet (Bastion patch (56)).
var ErrFull = errors.New("buffer: full")

// keepBytes is how much room a bounded buffer's slots keep between them
// for the packets to come once the packets they held have been read
// (Bastion patch (56)): a slot's room is kept while they keep at most
// this, and let go after a read otherwise. One slot per packet of a
// burst would otherwise keep the room of the largest packet it ever held
// for the buffer's life.
const keepBytes = 8 << 10

// AddrPacket is a packet payload and the associated remote address from which
// it was received.
type AddrPacket struct {
	addr net.Addr
	data bytes.Buffer
}

// PacketBuffer is a circular buffer for network packets. Each slot in the
// buffer contains the remote address from which the packet was received, as
// well as the packet data.
type PacketBuffer struct {
	mutex sync.Mutex

	packets     []AddrPacket
	write, read int

	// full indicates whether the buffer is full, which is needed to distinguish
	// when the write pointer and read pointer are at the same index.
	full bool

	// maxPackets and maxBytes, when not zero, bound the packets queued
	// and their bytes (queued); kept is the room of every slot's buffer.
	// Bastion patch (56), see NewBoundedPacketBuffer.
	maxPackets, maxBytes int
	queued, kept         int

	// notify wakes a waiting reader. Bastion patch (third_party/README.md):
	// one channel with room for one token, made at the first wait, instead
	// of a channel per wait closed by the next write. Close closes it.
	notify  chan struct{}
	waiting int // readers waiting on notify
	closed  bool

	readDeadline *deadline.Deadline
}

// NewPacketBuffer creates a new PacketBuffer.
func NewPacketBuffer() *PacketBuffer {
	return &PacketBuffer{
		readDeadline: deadline.New(),
		// In the narrow context in which this package is currently used, there
		// will always be at least one packet written to the buffer. Therefore,
		// we opt to allocate with size of 1 during construction, rather than
		// waiting until that first packet is written.
		packets: make([]AddrPacket, 1),
		full:    false,
	}
}

// NewBoundedPacketBuffer is NewPacketBuffer that holds at most maxPackets
// packets and maxBytes of their bytes: WriteTo refuses a packet beyond
// either with ErrFull; and once its packets have been read, its slots
// keep at most keepBytes of room between them (Bastion patch (56):
// pion's buffer grew without bound, and each slot kept the room of the
// largest packet it had held). maxBytes must be at least the largest
// packet written, which an empty buffer always takes.
func NewBoundedPacketBuffer(maxPackets, maxBytes int) *PacketBuffer {
	b := NewPacketBuffer()
	b.maxPackets, b.maxBytes = maxPackets, maxBytes

	return b
}

// Len returns the number of packets queued and their bytes (Bastion
// patch (56)).
func (b *PacketBuffer) Len() (packets, bytes int) {
	b.mutex.Lock()
	defer b.mutex.Unlock()

	return b.lenLocked(), b.queued
}

// lenLocked is the number of packets queued; the mutex is held.
func (b *PacketBuffer) lenLocked() int {
	if b.full {
		return len(b.packets)
	}

	return (b.write - b.read + len(b.packets)) % len(b.packets)
}

// WriteTo writes a single packet to the buffer. The supplied address will
// remain associated with the packet.
func (b *PacketBuffer) WriteTo(pkt []byte, addr net.Addr) (int, error) {
	b.mutex.Lock()

	if b.closed {
		b.mutex.Unlock()

		return 0, io.ErrClosedPipe
	}
	if b.maxPackets > 0 && (b.lenLocked() >= b.maxPackets || b.queued+len(pkt) > b.maxBytes) {
		b.mutex.Unlock()

		return 0, ErrFull
	}

	// Check to see if we are full.
	if b.full {
		// If so, grow AddrPacket buffer.
		var newSize int
		if len(b.packets) < 128 {
			// Double the number of packets.
			newSize = len(b.packets) * 2
		} else {
			// Increase the number of packets by 25%.
			newSize = 5 * len(b.packets) / 4
		}
		if b.maxPackets > 0 {
			newSize = min(newSize, b.maxPackets)
		}
		newBuf := make([]AddrPacket, newSize)
		var n int
		if b.read < b.write {
			n = copy(newBuf, b.packets[b.read:b.write])
		} else {
			n = copy(newBuf, b.packets[b.read:])
			n += copy(newBuf[n:], b.packets[:b.write])
		}

		b.packets = newBuf

		// Update read/write pointers and mark buffer as not full.
		b.read = 0
		b.write = n
		b.full = false
	}

	// Store the packet at the write pointer.
	packet := &b.packets[b.write]
	packet.data.Reset()
	if packet.data.Cap() < len(pkt) {
		// Bastion patch (42): a slot too small for pkt gets a buffer of
		// pkt's size, instead of twice the old one (bytes.Buffer's
		// growth) that it then keeps for the connection's life.
		b.kept += len(pkt) - packet.data.Cap()
		packet.data = *bytes.NewBuffer(make([]byte, 0, len(pkt)))
	}
	n, err := packet.data.Write(pkt)
	if err != nil {
		b.mutex.Unlock()

		return n, err
	}
	packet.addr = addr
	b.queued += n

	// Increment write pointer.
	b.write++

	// If the write pointer is equal to the length of the buffer, wrap around.
	if len(b.packets) == b.write {
		b.write = 0
	}

	// If a write resulted in making write and read pointers equivalent, then we
	// are full.
	if b.write == b.read {
		b.full = true
	}

	b.wakeLocked()
	b.mutex.Unlock()

	return n, nil
}

// Empty reports whether no packet is queued (Bastion patch: the listener
// hands a datagram to its connection's inline reader only when nothing is
// queued before it).
func (b *PacketBuffer) Empty() bool {
	b.mutex.Lock()
	defer b.mutex.Unlock()

	return b.read == b.write && !b.full
}

// wakeLocked gives a waiting reader a token, if it has none yet; the mutex
// is held and the buffer is open.
func (b *PacketBuffer) wakeLocked() {
	if b.waiting > 0 {
		select {
		case b.notify <- struct{}{}:
		default:
		}
	}
}

// errWaitDone is what readFrom returns when done is closed first.
var errWaitDone = errors.New("buffer: wait ended")

// ReadFrom reads a single packet from the buffer, or blocks until one is
// available.
func (b *PacketBuffer) ReadFrom(packet []byte) (n int, addr net.Addr, err error) {
	return b.ReadFromDone(packet, nil)
}

// ReadFromDone is ReadFrom that also stops waiting when done is closed,
// with an error (Bastion patch, third_party/README.md).
func (b *PacketBuffer) ReadFromDone(packet []byte, done <-chan struct{}) (n int, addr net.Addr, err error) { //nolint:cyclop
	select {
	case <-b.readDeadline.Done():
		return 0, nil, ErrTimeout
	default:
	}

	waited := false
	for {
		b.mutex.Lock()
		if waited {
			b.waiting--
			waited = false
		}

		if b.read != b.write || b.full {
			ap := b.packets[b.read]
			if len(packet) < ap.data.Len() {
				b.mutex.Unlock()

				return 0, nil, io.ErrShortBuffer
			}

			// Copy packet data from buffer.
			n, err := ap.data.Read(packet)
			if err != nil {
				b.mutex.Unlock()

				return n, nil, err
			}
			b.queued -= n
			if b.maxBytes > 0 && b.kept > keepBytes {
				// Bastion patch (56): the slot lets its room go.
				b.kept -= ap.data.Cap()
				b.packets[b.read].data = bytes.Buffer{}
			}

			// Advance read pointer.
			b.read++
			if len(b.packets) == b.read {
				b.read = 0
			}

			// If we were full before reading and have successfully read, we are
			// no longer full.
			if b.full {
				b.full = false
			}
			// Another waiting reader may take the next packet (a token
			// is not a broadcast).
			if b.read != b.write && !b.closed {
				b.wakeLocked()
			}

			b.mutex.Unlock()

			return n, ap.addr, nil
		}

		if b.closed {
			b.mutex.Unlock()

			return 0, nil, io.EOF
		}

		if b.notify == nil {
			b.notify = make(chan struct{}, 1)
		}
		notify := b.notify
		b.waiting++
		waited = true
		b.mutex.Unlock()

		select {
		case <-b.readDeadline.Done():
			b.mutex.Lock()
			b.waiting--
			b.mutex.Unlock()

			return 0, nil, ErrTimeout
		case <-done:
			b.mutex.Lock()
			b.waiting--
			b.mutex.Unlock()

			return 0, nil, errWaitDone
		case <-notify:
		}
	}
}

// Close closes the buffer, allowing unread packets to be read, but erroring on
// any new writes.
func (b *PacketBuffer) Close() (err error) {
	b.mutex.Lock()

	if b.closed {
		b.mutex.Unlock()

		return nil
	}

	b.closed = true
	if b.notify != nil {
		close(b.notify) // wakes every waiting reader
	}

	b.mutex.Unlock()

	return nil
}

// SetReadDeadline sets the read deadline for the buffer.
func (b *PacketBuffer) SetReadDeadline(t time.Time) error {
	b.readDeadline.Set(t)

	return nil
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"math"
	"slices"
	"sort"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

const (
	// 2 megabytes.
	fragmentBufferMaxSize = 2000000
	// Bastion patch (55): was 1000; now the most fragments that
	// fragmentBufferMaxHeld holds (each is charged at least
	// fragmentHeldOverhead), so that the byte bound is the one that binds.
	fragmentBufferMaxCount = fragmentBufferMaxHeld / fragmentHeldOverhead

	// fragmentBufferMaxHeld bounds what a connection's fragment buffer
	// holds: the bytes of every fragment it keeps, each charged
	// fragmentHeldOverhead more for its bookkeeping (its range, its
	// message's entry). Bastion patch (55): pion bounded the fragments'
	// bytes at 2 MB and their number at 1000, and each kept the whole
	// record it came in, so that 1000 fragments of one byte, each in an
	// 8 KiB record, held about 8 MiB per connection; a peer sends
	// fragments of messages to come (or, after the handshake, of messages
	// that never come) and they stay until the connection ends. 64 KiB
	// holds a whole flight whose fragments all arrive before its first
	// one: a certificate chain of tens of KiB (Bastion's are under 2 KiB),
	// more than mbedTLS (16 KiB by default) or tinydtls take in one
	// message.
	fragmentBufferMaxHeld = 64 << 10
	fragmentHeldOverhead  = 128
)

// fragmentRange is the payload of one handshake fragment.
type fragmentRange struct {
	offset uint32
	data   []byte
}

func (r fragmentRange) end() uint32 {
	return r.offset + uint32(len(r.data)) //nolint:gosec // G115: fragment lengths are 24 bit.
}

// fragments holds what has been received of one handshake message. A peer may
// fragment a retransmitted message differently from the original transmission
// (RFC 6347 Section 4.2.3), so fragments can overlap. ranges is sorted by
// offset and never holds a fragment that another one fully covers, which
// makes its ends increase as well; covered is the length of the contiguous
// prefix of the message received so far and is advanced as fragments arrive,
// so completeness is known without scanning.
type fragments struct {
	ranges          []fragmentRange
	covered         uint32
	handshakeType   handshake.Type
	handshakeLength uint32
	// From the first fragment received at offset 0.
	handshakeHeader handshake.Header
	epoch           uint16
	hasStart        bool
	// whole: the message arrived in one fragment, and this is it with its
	// handshake header, which then is the header pop would write (offset
	// 0, fragment length = length); ranges stays empty (Bastion patch).
	whole []byte
}

// add stores a fragment if its count increase fits within available, returning
// the change in stored fragment count and bytes. Replacing smaller fragments
// can decrease both counts.
func (f *fragments) add(offset uint32, data []byte, available int) (fragmentDelta, byteDelta int, err error) {
	return f.addWithin(offset, data, available, math.MaxInt, false)
}

// addWithin is add that also fails unless the change in stored bytes, each
// fragment charged fragmentHeldOverhead more, fits within room, and that
// stores a copy of data when own is set (Bastion patch (55): the fragment
// buffer's data is a slice of a record, which it must not keep).
func (f *fragments) addWithin(
	offset uint32, data []byte, available, room int, own bool,
) (fragmentDelta, byteDelta int, err error) {
	if len(data) == 0 {
		data = nil
	}
	frag := fragmentRange{offset: offset, data: data}

	// First fragment starting at or after offset.
	i := sort.Search(len(f.ranges), func(k int) bool { return f.ranges[k].offset >= offset })
	if f.covers(i, frag) {
		return 0, 0, nil
	}

	// ranges[i:j] start inside the new fragment and end inside it: covered.
	j := i
	for j < len(f.ranges) && f.ranges[j].end() <= frag.end() {
		fragmentDelta--
		byteDelta -= len(f.ranges[j].data)
		j++
	}
	fragmentDelta++
	if fragmentDelta > available || byteDelta+len(data)+fragmentDelta*fragmentHeldOverhead > room {
		return 0, 0, errFragmentBufferOverflow
	}
	if own {
		frag.data = bytes.Clone(data)
	}

	f.ranges = slices.Replace(f.ranges, i, j, frag)
	f.advanceCovered(i)

	return fragmentDelta, byteDelta + len(data), nil
}

// covers reports whether a stored fragment already carries every byte of
// frag, whose insertion index is i. Since ends increase with offsets, only
// the fragment before i and one starting at the same offset can.
func (f *fragments) covers(i int, frag fragmentRange) bool {
	if i > 0 && f.ranges[i-1].end() >= frag.end() {
		return true
	}

	return i < len(f.ranges) && f.ranges[i].offset == frag.offset && f.ranges[i].end() >= frag.end()
}

// advanceCovered extends the covered prefix after inserting ranges[i]. Only
// a fragment touching the prefix can extend it, possibly through fragments
// received earlier that start within its reach.
func (f *fragments) advanceCovered(i int) {
	if f.ranges[i].offset > f.covered {
		return
	}
	for k := i; k < len(f.ranges) && f.ranges[k].offset <= f.covered; k++ {
		f.covered = max(f.covered, f.ranges[k].end())
	}
}

type fragmentBuffer struct {
	// map of MessageSequenceNumbers that hold slices of fragments
	cache map[uint16]*fragments

	currentMessageSequenceNumber uint16

	totalBufferSize    int
	totalFragmentCount int

	// spare is the entry of the last whole message pop returned, which
	// nothing refers to any more, for the next whole message (Bastion
	// patch (38): one allocation per handshake, not one per message).
	spare *fragments

	// finishedAgain: the last push held the first fragment of a Finished
	// that the buffer had handed on already, the peer's retransmission of
	// its last flight (Bastion patch (59)).
	finishedAgain bool

	// afterHandshake: the connection is a server whose handshake has
	// completed (set by the connection before each push). A fragment of a
	// message to come is refused (errFragmentAfterHandshake), not kept:
	// no such message is legitimate, pion renegotiates nothing (Bastion
	// patch (60)).
	afterHandshake bool
}

func newFragmentBuffer() *fragmentBuffer {
	return &fragmentBuffer{cache: map[uint16]*fragments{}}
}

// current total size of buffer.
func (f *fragmentBuffer) size() int {
	return f.totalBufferSize
}

// held is what the buffer holds, as fragmentBufferMaxHeld counts it
// (Bastion patch (55)).
func (f *fragmentBuffer) held() int {
	return f.totalBufferSize + f.totalFragmentCount*fragmentHeldOverhead
}

// Attempts to push a DTLS packet to the fragmentBuffer
// when it returns true it means the fragmentBuffer has inserted and the buffer shouldn't be handled
// when an error returns it is fatal, and the DTLS connection should be stopped.
// Bastion patch (55): the buffer keeps copies of the fragments it stores,
// never buf, which the caller may reuse (pion kept slices of it).
func (f *fragmentBuffer) push(buf []byte) (isHandshake, isRetransmit bool, err error) { //nolint:cyclop
	f.finishedAgain = false
	if f.size()+len(buf) >= fragmentBufferMaxSize {
		return false, false, errFragmentBufferOverflow
	}

	recordLayerHeader := recordlayer.Header{}
	if err := recordLayerHeader.Unmarshal(buf); err != nil {
		return false, false, err
	}

	// fragment isn't a handshake, we don't need to handle it
	if recordLayerHeader.ContentType != protocol.ContentTypeHandshake {
		return false, false, nil
	}

	for buf = buf[recordlayer.FixedHeaderSize:]; len(buf) != 0; { //nolint:gosec // G602
		var header handshake.Header
		if err := header.Unmarshal(buf); err != nil {
			return false, false, err
		}

		// Fragment is a retransmission. We have already assembled it before successfully
		isRetransmit = header.FragmentOffset == 0 && header.MessageSequence < f.currentMessageSequenceNumber
		if isRetransmit && header.Type == handshake.TypeFinished {
			f.finishedAgain = true
		}

		end := int(handshake.HeaderLength + header.FragmentLength)
		if end > len(buf) {
			return false, false, errBufferTooSmall
		}
		data := buf[handshake.HeaderLength:end]
		rawMessage := buf[:end:end]
		buf = buf[end:]

		// Already assembled, or claims bytes outside the message.
		if header.MessageSequence < f.currentMessageSequenceNumber ||
			header.FragmentOffset > header.Length ||
			header.FragmentLength > header.Length-header.FragmentOffset {
			continue
		}
		if f.afterHandshake {
			return false, false, errFragmentAfterHandshake
		}

		messageFragments, ok := f.cache[header.MessageSequence]
		if !ok {
			if header.FragmentOffset == 0 && header.FragmentLength == header.Length && header.Length > 0 {
				// Bastion patch: the whole message in one fragment (the
				// usual case) is kept as it came, with its header: what
				// add and pop would store and rebuild. (An empty one
				// takes add's way, which keeps no slice of the record.)
				if f.totalFragmentCount+1 > fragmentBufferMaxCount ||
					len(data)+fragmentHeldOverhead > fragmentBufferMaxHeld-f.held() {
					return false, false, errFragmentBufferOverflow
				}
				entry := f.spare
				if entry == nil {
					entry = &fragments{}
				}
				f.spare = nil
				*entry = fragments{
					handshakeType: header.Type, handshakeLength: header.Length, covered: header.Length,
					handshakeHeader: header, epoch: recordLayerHeader.Epoch, hasStart: true,
					whole: bytes.Clone(rawMessage), // (55): not a slice of buf
				}
				f.cache[header.MessageSequence] = entry
				f.totalFragmentCount++
				f.totalBufferSize += len(data)

				continue
			}
			messageFragments = &fragments{handshakeType: header.Type, handshakeLength: header.Length}
		} else if header.Type != messageFragments.handshakeType || header.Length != messageFragments.handshakeLength {
			// Disagrees with the message's earlier fragments; admitting it
			// would break the bounds pop relies on.
			continue
		} else if messageFragments.whole != nil {
			continue // covered by the whole message
		}

		// empty fragments also count because retaining them consumes memory.
		fragmentDelta, byteDelta, err := messageFragments.addWithin(
			header.FragmentOffset, data, fragmentBufferMaxCount-f.totalFragmentCount,
			fragmentBufferMaxHeld-f.held(), true,
		)
		if err != nil {
			return false, false, err
		}
		if !ok {
			f.cache[header.MessageSequence] = messageFragments
		}
		if header.FragmentOffset == 0 && !messageFragments.hasStart {
			messageFragments.handshakeHeader = header
			messageFragments.epoch = recordLayerHeader.Epoch
			messageFragments.hasStart = true
		}

		f.totalFragmentCount += fragmentDelta
		f.totalBufferSize += byteDelta
	}

	return true, isRetransmit, nil
}

func (f *fragmentBuffer) pop() (content []byte, epoch uint16) {
	frags, ok := f.cache[f.currentMessageSequenceNumber]
	if !ok || frags.covered < frags.handshakeLength {
		return nil, 0
	}
	if frags.whole != nil {
		f.totalBufferSize -= len(frags.whole) - handshake.HeaderLength
		f.totalFragmentCount--
		delete(f.cache, f.currentMessageSequenceNumber)
		f.currentMessageSequenceNumber++
		whole, epoch := frags.whole, frags.epoch
		*frags = fragments{} // Bastion patch (38): it keeps no record
		f.spare = frags

		return whole, epoch
	}

	firstHeader := frags.handshakeHeader
	firstHeader.FragmentOffset = 0
	firstHeader.FragmentLength = firstHeader.Length

	rawHeader, _ := firstHeader.Marshal()

	// The message is contiguous, so each fragment continues at or before
	// where the previous one ended.
	content = make([]byte, 0, len(rawHeader)+int(frags.handshakeLength))
	content = append(content, rawHeader...)
	cursor := uint32(0)
	for _, frag := range frags.ranges {
		content = append(content, frag.data[cursor-frag.offset:]...)
		cursor = frag.end()
		f.totalBufferSize -= len(frag.data)
	}
	f.totalFragmentCount -= len(frags.ranges)

	delete(f.cache, f.currentMessageSequenceNumber)
	f.currentMessageSequenceNumber++

	return content, frags.epoch
}

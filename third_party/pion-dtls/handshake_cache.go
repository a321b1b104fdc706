// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"crypto/sha256"
	"sync"

	"github.com/pion/dtls/v3/pkg/crypto/prf"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

// Bound payload storage and metadata, including empty messages. Allow room for
// both peers' certificate flights and the remaining transcript.
// Bastion patch (57): 4 × fragmentBufferMaxHeld (256 KiB) and 128 messages,
// where pion allowed 4 × 2 MB and 1000: a peer, during the handshake, sends
// whole messages one after the other, which the fragment buffer hands on as
// they come and the cache keeps until the handshake ends, whatever their
// type. No message the peer sends is larger than the fragment buffer holds;
// a transcript has about fifteen.
const (
	handshakeCacheMaxSize  = 4 * fragmentBufferMaxHeld
	handshakeCacheMaxCount = 128
)

type handshakeCacheItem struct {
	typ             handshake.Type
	isClient        bool
	epoch           uint16
	messageSequence uint16
	data            []byte
}

type handshakeCachePullRule struct {
	typ      handshake.Type
	epoch    uint16
	isClient bool
	optional bool
}

type handshakeCache struct {
	cache []*handshakeCacheItem
	// first holds the first items and cache's first slots, so that a
	// handshake's messages (about ten) take no allocation each (Bastion
	// patch (24)); later ones are allocated as before.
	first                         [handshakeCacheInline]handshakeCacheItem
	firstPtrs                     [handshakeCacheInline]*handshakeCacheItem
	size                          int
	complete                      bool
	mu                            sync.Mutex
	clientHelloRetransmit         *fragments
	clientHelloRetransmitSequence uint16
}

// handshakeCacheInline is how many items a handshakeCache holds without
// an allocation each: a full handshake with certificates on both sides
// has thirteen messages.
const handshakeCacheInline = 14

func newHandshakeCache() *handshakeCache {
	h := &handshakeCache{}
	h.cache = h.firstPtrs[:0]

	return h
}

func (h *handshakeCache) push(data []byte, epoch, messageSequence uint16, typ handshake.Type, isClient bool) error {
	return h.pushData(data, false, epoch, messageSequence, typ, isClient)
}

// pushOwned is push of data that no one writes to afterwards, which the
// cache then keeps without a copy (Bastion patch: a reassembled message
// and a marshaled outgoing one are new slices that are only read).
func (h *handshakeCache) pushOwned(data []byte, epoch, messageSequence uint16, typ handshake.Type, isClient bool) error {
	return h.pushData(data, true, epoch, messageSequence, typ, isClient)
}

func (h *handshakeCache) pushData(
	data []byte, owned bool, epoch, messageSequence uint16, typ handshake.Type, isClient bool,
) error {
	h.mu.Lock()
	defer h.mu.Unlock()

	if h.complete {
		return nil
	}
	for _, item := range h.cache {
		if item.epoch == epoch && item.messageSequence == messageSequence && item.isClient == isClient {
			return nil
		}
	}
	if len(h.cache) >= handshakeCacheMaxCount || len(data) > handshakeCacheMaxSize-h.size {
		return errHandshakeCacheOverflow
	}
	h.size += len(data)
	if !owned {
		data = bytes.Clone(data)
	}
	var item *handshakeCacheItem
	if n := len(h.cache); n < len(h.first) && cap(h.cache) == len(h.firstPtrs) {
		item = &h.first[n]
	} else {
		item = &handshakeCacheItem{}
	}
	*item = handshakeCacheItem{
		data:            data,
		epoch:           epoch,
		messageSequence: messageSequence,
		typ:             typ,
		isClient:        isClient,
	}
	h.cache = append(h.cache, item)

	return nil
}

// finish preserves the transcript for retransmissions without retaining new messages.
func (h *handshakeCache) finish() {
	h.mu.Lock()
	defer h.mu.Unlock()

	h.complete = true
	h.clientHelloRetransmit = nil
}

// returns a list handshakes that match the requested rules
// the list will contain null entries for rules that can't be satisfied
// multiple entries may match a rule, but only the last match is returned (ie ClientHello with cookies).
func (h *handshakeCache) pull(rules ...handshakeCachePullRule) []*handshakeCacheItem {
	h.mu.Lock()
	defer h.mu.Unlock()

	out := make([]*handshakeCacheItem, len(rules))
	for i, r := range rules {
		for _, c := range h.cache {
			if c.typ == r.typ && c.isClient == r.isClient && c.epoch == r.epoch {
				switch {
				case out[i] == nil:
					out[i] = c
				case out[i].messageSequence < c.messageSequence:
					out[i] = c
				}
			}
		}
	}

	return out
}

// pullOne is pull of one rule, with no slice allocated for the answer
// (Bastion patch (24)).
func (h *handshakeCache) pullOne(r handshakeCachePullRule) *handshakeCacheItem {
	h.mu.Lock()
	defer h.mu.Unlock()

	var out *handshakeCacheItem
	for _, c := range h.cache {
		if c.typ == r.typ && c.isClient == r.isClient && c.epoch == r.epoch &&
			(out == nil || out.messageSequence < c.messageSequence) {
			out = c
		}
	}

	return out
}

// pulledMessages holds what fullPullMap found, indexed by handshake type
// as its map was (Bastion patch (33)): an array returned by value instead
// of a map allocated for every pull. Every type a flight asks for is at
// most handshake.TypeFinished; a missing one is nil, as the map's zero
// value was.
type pulledMessages [handshake.TypeFinished + 1]handshake.Message

// fullPullMap pulls all handshakes between rules[0] to rules[len(rules)-1] as map.
//
//nolint:cyclop
func (h *handshakeCache) fullPullMap(
	startSeq int,
	cipherSuite CipherSuite,
	rules ...handshakeCachePullRule,
) (int, pulledMessages, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()

	// Bastion patch: the item of each rule in a slice on the stack, not a
	// map per call; ci[i] is the item of rules[i].
	var ciArray [8]*handshakeCacheItem
	ci := ciArray[:0]
	for _, rule := range rules {
		var item *handshakeCacheItem
		for _, c := range h.cache {
			if c.typ == rule.typ && c.isClient == rule.isClient && c.epoch == rule.epoch {
				switch {
				case item == nil:
					item = c
				case item.messageSequence < c.messageSequence:
					item = c
				}
			}
		}
		if !rule.optional && item == nil {
			// Missing mandatory message.
			return startSeq, pulledMessages{}, false
		}
		if int(rule.typ) >= len(pulledMessages{}) {
			// Not a type any flight pulls (Bastion patch (33)).
			return startSeq, pulledMessages{}, false
		}
		ci = append(ci, item)
	}
	var out pulledMessages
	seq := startSeq
	ok := false
	for k, r := range rules {
		typ := r.typ
		// What the map held for typ: the item of the last rule of that
		// type.
		i := ci[k]
		for j := len(rules) - 1; j > k; j-- {
			if rules[j].typ == typ {
				i = ci[j]

				break
			}
		}
		if i == nil {
			continue
		}
		var keyExchangeAlgorithm CipherSuiteKeyExchangeAlgorithm
		if cipherSuite != nil {
			keyExchangeAlgorithm = cipherSuite.KeyExchangeAlgorithm()
		}
		rawHandshake := &handshake.Handshake{
			KeyExchangeAlgorithm: keyExchangeAlgorithm,
		}
		if err := rawHandshake.Unmarshal(i.data); err != nil {
			return startSeq, pulledMessages{}, false
		}
		if uint16(seq) != rawHandshake.Header.MessageSequence { //nolint:gosec // G115
			// There is a gap. Some messages are not arrived.
			return startSeq, pulledMessages{}, false
		}
		seq++
		ok = true
		out[typ] = rawHandshake.Message
	}
	if !ok {
		return seq, pulledMessages{}, false
	}

	return seq, out, true
}

// pullAndMerge calls pull and then merges the results, ignoring any null entries.
func (h *handshakeCache) pullAndMerge(rules ...handshakeCachePullRule) []byte {
	items := h.pull(rules...)
	// Bastion patch: sized once, not grown by doubling (it is the whole
	// transcript, a few hundred bytes to kilobytes).
	merged := make([]byte, 0, mergedLen(items))

	for _, p := range items {
		if p != nil {
			merged = append(merged, p.data...)
		}
	}

	return merged
}

func mergedLen(items []*handshakeCacheItem, additional ...[]byte) int {
	n := 0
	for _, p := range items {
		if p != nil {
			n += len(p.data)
		}
	}
	for _, a := range additional {
		n += len(a)
	}

	return n
}

// transcriptHashRoom is how long a transcript transcriptHash hashes on
// the stack with SHA-256: a PSK handshake's is a few hundred bytes.
const transcriptHashRoom = 1024

// transcriptHash appends to dst hf's hash of what pullAndMerge(rules...)
// returns, the same bytes in the same order, without pull's slice and,
// with SHA-256 and a transcript of up to transcriptHashRoom bytes, without
// a merged copy or a hash.Hash on the heap (Bastion patch (36)).
func (h *handshakeCache) transcriptHash(
	dst []byte, hf prf.HashFunc, rules ...handshakeCachePullRule,
) ([]byte, error) {
	h.mu.Lock()
	defer h.mu.Unlock()

	var itemsArray [16]*handshakeCacheItem
	items := itemsArray[:0]
	n := 0
	for _, r := range rules {
		// The item pull chooses for r: the first of the highest message
		// sequence of its type, side and epoch.
		var item *handshakeCacheItem
		for _, c := range h.cache {
			if c.typ == r.typ && c.isClient == r.isClient && c.epoch == r.epoch &&
				(item == nil || item.messageSequence < c.messageSequence) {
				item = c
			}
		}
		if item != nil {
			items = append(items, item)
			n += len(item.data)
		}
	}
	if prf.IsSHA256(hf) && n <= transcriptHashRoom {
		var buf [transcriptHashRoom]byte
		merged := buf[:0]
		for _, item := range items {
			merged = append(merged, item.data...)
		}
		sum := sha256.Sum256(merged)

		return append(dst, sum[:]...), nil
	}
	hash := hf()
	for _, item := range items {
		if _, err := hash.Write(item.data); err != nil {
			return nil, err
		}
	}

	return append(dst, hash.Sum(nil)...), nil
}

// sessionHash returns the session hash for Extended Master Secret support
// https://tools.ietf.org/html/draft-ietf-tls-session-hash-06#section-4
func (h *handshakeCache) sessionHash(hf prf.HashFunc, epoch uint16, additional ...[]byte) ([]byte, error) {
	if len(additional) == 0 {
		// Bastion patch (36): the same messages in the same order,
		// hashed where they are.
		return h.transcriptHash(nil, hf,
			handshakeCachePullRule{handshake.TypeClientHello, epoch, true, false},
			handshakeCachePullRule{handshake.TypeServerHello, epoch, false, false},
			handshakeCachePullRule{handshake.TypeCertificate, epoch, false, false},
			handshakeCachePullRule{handshake.TypeServerKeyExchange, epoch, false, false},
			handshakeCachePullRule{handshake.TypeCertificateRequest, epoch, false, false},
			handshakeCachePullRule{handshake.TypeServerHelloDone, epoch, false, false},
			handshakeCachePullRule{handshake.TypeCertificate, epoch, true, false},
			handshakeCachePullRule{handshake.TypeClientKeyExchange, epoch, true, false},
		)
	}
	// Order defined by https://tools.ietf.org/html/rfc5246#section-7.3
	handshakeBuffer := h.pull(
		handshakeCachePullRule{handshake.TypeClientHello, epoch, true, false},
		handshakeCachePullRule{handshake.TypeServerHello, epoch, false, false},
		handshakeCachePullRule{handshake.TypeCertificate, epoch, false, false},
		handshakeCachePullRule{handshake.TypeServerKeyExchange, epoch, false, false},
		handshakeCachePullRule{handshake.TypeCertificateRequest, epoch, false, false},
		handshakeCachePullRule{handshake.TypeServerHelloDone, epoch, false, false},
		handshakeCachePullRule{handshake.TypeCertificate, epoch, true, false},
		handshakeCachePullRule{handshake.TypeClientKeyExchange, epoch, true, false},
	)

	// Bastion patch: hashed message by message, not merged into a copy of
	// the transcript first (same bytes in the same order).
	hash := hf()
	for _, p := range handshakeBuffer {
		if p == nil {
			continue
		}
		if _, err := hash.Write(p.data); err != nil {
			return []byte{}, err
		}
	}
	for _, a := range additional {
		if _, err := hash.Write(a); err != nil {
			return []byte{}, err
		}
	}

	return hash.Sum(nil), nil
}

// isClientHelloRetransmit recognizes an unchanged copy of the most recent
// ClientHello, including retransmissions fragmented differently from the original.
// Partial fragments and older cookie exchanges do not trigger a response.
func (h *handshakeCache) isClientHelloRetransmit(packet []byte) bool {
	var record recordlayer.Header
	if err := record.Unmarshal(packet); err != nil {
		return false
	}
	if record.ContentType != protocol.ContentTypeHandshake || record.Epoch != 0 {
		return false
	}
	cached := h.pullOne(handshakeCachePullRule{typ: handshake.TypeClientHello, epoch: 0, isClient: true})
	if cached == nil {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()

	for payload := packet[recordlayer.FixedHeaderSize:]; len(payload) > 0; {
		var header handshake.Header
		if err := header.Unmarshal(payload); err != nil {
			return false
		}
		size := handshake.HeaderLength + int(header.FragmentLength)
		if size > len(payload) {
			return false
		}
		data := payload[handshake.HeaderLength:size]
		payload = payload[size:]
		complete, err := h.addClientHelloRetransmit(cached, header, data)
		if err != nil {
			return false
		}
		if complete {
			return true
		}
	}

	return false
}

func (c *handshakeCacheItem) matchesClientHelloFragment(header handshake.Header, data []byte) bool {
	if header.Type != handshake.TypeClientHello || header.MessageSequence != c.messageSequence ||
		int(header.Length) != len(c.data)-handshake.HeaderLength ||
		header.FragmentOffset > header.Length || header.FragmentLength > header.Length-header.FragmentOffset {
		return false
	}
	original := c.data[handshake.HeaderLength:]

	return bytes.Equal(data, original[header.FragmentOffset:header.FragmentOffset+header.FragmentLength])
}

func (h *handshakeCache) addClientHelloRetransmit(
	cached *handshakeCacheItem,
	header handshake.Header,
	data []byte,
) (bool, error) {
	if !cached.matchesClientHelloFragment(header, data) {
		return false, nil
	}
	if header.FragmentOffset == 0 && header.FragmentLength == header.Length && header.Length > 0 {
		// Bastion patch (43): the whole message in one fragment completes
		// a copy whatever came before, as adding it to a new or to the
		// pending fragments would, without making them.
		h.clientHelloRetransmit = nil

		return true, nil
	}
	if h.clientHelloRetransmit == nil || h.clientHelloRetransmitSequence != header.MessageSequence {
		h.clientHelloRetransmit = &fragments{}
		h.clientHelloRetransmitSequence = header.MessageSequence
	}
	fragments := h.clientHelloRetransmit
	available := fragmentBufferMaxCount - len(fragments.ranges)
	original := cached.data[handshake.HeaderLength:]
	fragment := original[header.FragmentOffset : header.FragmentOffset+header.FragmentLength]
	if _, _, err := fragments.add(header.FragmentOffset, fragment, available); err != nil {
		h.clientHelloRetransmit = nil

		return false, err
	}
	if fragments.covered == header.Length {
		h.clientHelloRetransmit = nil

		return true, nil
	}

	return false, nil
}

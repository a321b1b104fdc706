package otacache

import (
	"slices"
	"time"
)

// exchangeLifetime is RFC 7252's EXCHANGE_LIFETIME with the default
// transmission parameters: how long a retransmission can still arrive.
const exchangeLifetime = 247 * time.Second

// ResponseCache keeps a session's last responses, encoded, to answer a
// retransmitted request with the same bytes without running the handler
// again (RFC 7252 §4.5).
//
// go-coap's default per-connection cache keeps every response for
// EXCHANGE_LIFETIME (247 s). Serving firmware means one ~1.1 KiB response
// per block; 100 devices fetching 16 MiB images made a go-coap DTLS server
// grow past 3.5 GiB of RSS in four minutes. A device using stop-and-wait
// transfer (NSTART = 1) only ever retransmits its latest requests, so
// keeping the last few responses is enough.
//
// It belongs to one session (ServeDTLS) and is not safe for concurrent
// use: the session guards it with a mutex (a deferred answer is stored
// from the goroutine that completes it). Its slots are allocated on first use, so an
// idle session holds none.
type ResponseCache struct {
	slots []cacheSlot
	// mids mirrors slots[i].mid, so that the look-up every request makes
	// reads one cache line instead of every slot.
	mids []uint16
	size int
	next int
	// pending are the message IDs of requests whose answer was deferred
	// and is not stored yet (DTLSResponseWriter.Defer).
	pending []uint16
}

type cacheSlot struct {
	mid     uint16
	raw     []byte // empty: no answer held
	expires int64  // Unix ns
}

// slotBytes is the capacity a slot's buffer starts with: one datagram of
// go-coap's MTU, so a firmware block's answer never regrows it.
const slotBytes = 1472

// NewResponseCache keeps at most entries responses (at least 1).
func NewResponseCache(entries int) *ResponseCache {
	return &ResponseCache{size: max(entries, 1)}
}

// load returns the encoded response to the request with message ID mid.
func (c *ResponseCache) load(mid uint16) ([]byte, bool) {
	for i, m := range c.mids {
		if m != mid {
			continue
		}
		// The clock is read only for a match: nearly every request is new.
		if s := &c.slots[i]; len(s.raw) > 0 && time.Now().UnixNano() < s.expires {
			return s.raw, true
		}
	}
	return nil, false
}

// store keeps a copy of raw, the response to the request with message ID
// mid, replacing the oldest entry. Slot buffers are reused, so storing does
// not allocate once the cache is warm.
func (c *ResponseCache) store(mid uint16, raw []byte) {
	buf := c.reserve(len(raw))
	copy(buf, raw)
	c.commit(mid, buf, time.Now())
}

// reserve empties the oldest slot and returns its buffer with length n,
// for the caller to encode the next response into; commit then keeps it.
// (ServeDTLS encodes every answer there: a block's answer is not copied
// into the cache.) Until commit the slot holds no answer.
func (c *ResponseCache) reserve(n int) []byte {
	if len(c.slots) < c.size {
		c.slots = append(c.slots, cacheSlot{})
		c.mids = append(c.mids, 0)
		c.next = len(c.slots) - 1
	}
	s := &c.slots[c.next]
	s.raw = s.raw[:0]
	if cap(s.raw) < n {
		s.raw = make([]byte, 0, max(n, slotBytes))
	}
	return s.raw[:n]
}

// commit keeps raw, which reserve returned (or a prefix of it), as the
// response to mid, sent at now, and makes that slot the newest.
func (c *ResponseCache) commit(mid uint16, raw []byte, now time.Time) {
	s := &c.slots[c.next]
	s.mid, s.raw, s.expires = mid, raw, now.Add(exchangeLifetime).UnixNano()
	c.mids[c.next] = mid
	c.next = (c.next + 1) % c.size
	c.unmarkPending(mid)
}

// unmarkPending forgets that the answer to mid was deferred.
func (c *ResponseCache) unmarkPending(mid uint16) {
	if i := slices.Index(c.pending, mid); i >= 0 {
		c.pending = slices.Delete(c.pending, i, i+1)
	}
}

// markPending records that the answer to the request with message ID mid
// will be stored later.
func (c *ResponseCache) markPending(mid uint16) {
	if !slices.Contains(c.pending, mid) {
		c.pending = append(c.pending, mid)
	}
}

// isPending reports whether the answer to mid was deferred and is not
// stored yet.
func (c *ResponseCache) isPending(mid uint16) bool { return slices.Contains(c.pending, mid) }

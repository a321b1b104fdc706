package otacache

import (
	"io"
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
	mid uint16
	// raw is the encoded answer (empty: no answer held); with src, only
	// its bytes before the payload, which is n bytes of src at off.
	raw     []byte
	src     StableBody
	off     int64
	n       int
	expires int64 // Unix ns
}

// StableBody is a response body whose bytes never change (a verified
// firmware image: Cache.ServeCoAP's bodies are). For an answer with such a
// body the response cache keeps where its payload is, not a copy of it:
// a retransmission reads the same bytes again. A firmware block is the
// answer to nearly every request a session gets; copying each into the
// cache wrote 1 KiB to memory no core had touched for thousands of blocks
// (32 answers x 100 sessions), about a tenth of the gateway's CPU per block
// besides the syscalls. If the body can no longer be read (the image was
// dropped), the retransmission is handled afresh, as a new request.
type StableBody interface {
	io.ReaderAt
	// StableBody is a marker: the body's bytes at an offset never change.
	StableBody()
}

// NewResponseCache keeps at most entries responses (at least 1).
func NewResponseCache(entries int) *ResponseCache {
	return &ResponseCache{size: max(entries, 1)}
}

// load returns the slot holding the answer to the request with message
// ID mid; it is valid until the cache is next changed.
func (c *ResponseCache) load(mid uint16) (*cacheSlot, bool) {
	for i, m := range c.mids {
		if m != mid {
			continue
		}
		// The clock is read only for a match: nearly every request is new.
		if s := &c.slots[i]; len(s.raw) > 0 && time.Now().UnixNano() < s.expires {
			return s, true
		}
	}
	return nil, false
}

// answer appends the answer s holds to buf: its bytes, or its bytes
// before the payload and the payload read again from its body.
func (s *cacheSlot) answer(buf []byte) ([]byte, error) {
	buf = append(buf, s.raw...)
	if s.src == nil {
		return buf, nil
	}
	h := len(buf)
	buf = slices.Grow(buf, s.n)[:h+s.n]
	if n, err := s.src.ReadAt(buf[h:], s.off); n != s.n {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}

// drop forgets the answer s holds.
func (s *cacheSlot) drop() { s.raw, s.src = s.raw[:0], nil }

// store keeps a copy of raw, the response to the request with message ID
// mid sent at now, replacing the oldest entry. Slot buffers are reused, so
// storing does not allocate once the cache is warm.
func (c *ResponseCache) store(mid uint16, raw []byte, now time.Time) {
	s := c.take(mid, now)
	s.raw = append(s.raw[:0], raw...)
}

// storeRef keeps the response to mid whose payload is the n bytes of src
// at off: a copy of head, the bytes before the payload, and where the
// payload is.
func (c *ResponseCache) storeRef(mid uint16, head []byte, src StableBody, off int64, n int, now time.Time) {
	s := c.take(mid, now)
	s.raw = append(s.raw[:0], head...)
	s.src, s.off, s.n = src, off, n
}

// take makes the oldest slot (a new one while there are fewer than size)
// the one for mid and returns it.
func (c *ResponseCache) take(mid uint16, now time.Time) *cacheSlot {
	if len(c.slots) < c.size {
		c.slots = append(c.slots, cacheSlot{})
		c.mids = append(c.mids, 0)
		c.next = len(c.slots) - 1
	}
	i := c.next
	c.next = (c.next + 1) % c.size
	s := &c.slots[i]
	s.mid, s.src, s.expires = mid, nil, now.Add(exchangeLifetime).UnixNano()
	c.mids[i] = mid
	c.unmarkPending(mid)
	return s
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

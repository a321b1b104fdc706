package otacache

import (
	"sync"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/pool"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// ResponseCache is a bounded stand-in for go-coap's per-connection
// response cache (udp/client.MessageCache). It answers a retransmitted
// confirmable request with the same response (RFC 7252 §4.5).
//
// go-coap's default cache keeps every response of a connection for
// EXCHANGE_LIFETIME (247 s). Serving firmware means one ~1.1 KiB response
// per block. At the rates a gateway reaches, that default cache holds
// gigabytes: 100 devices fetching 16 MiB images made a go-coap DTLS server
// grow past 3.5 GiB of RSS in four minutes. A device using stop-and-wait
// transfer (NSTART = 1) only ever retransmits its latest requests, so
// keeping the last few responses is enough.
//
// go-coap's dtls.Server cannot be given a response cache. A CoAPS listener
// that serves firmware therefore builds its connections with
// udp/client.NewConnWithOpts(..., udpclient.WithResponseMessageCache(
// otacache.NewResponseCache(32)), ...). serve_test.go shows how.
type ResponseCache struct {
	mu    sync.Mutex
	slots []cacheSlot // grows to size on first use: idle sessions hold none
	size  int
	next  int
}

type cacheSlot struct {
	key     string
	raw     []byte
	expires time.Time
}

var _ udpclient.MessageCache = (*ResponseCache)(nil)

// NewResponseCache keeps at most entries responses (at least 1).
func NewResponseCache(entries int) *ResponseCache {
	return &ResponseCache{size: max(entries, 1)}
}

// Load fills msg with the cached response to the request with message ID key.
func (c *ResponseCache) Load(key string, msg *pool.Message) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	for i := range c.slots {
		s := &c.slots[i]
		if s.key == key && len(s.raw) > 0 && now.Before(s.expires) {
			if _, err := msg.UnmarshalWithDecoder(coder.DefaultCoder, s.raw); err != nil {
				return false, err
			}
			return true, nil
		}
	}
	return false, nil
}

// Store keeps the response to the request with message ID key, replacing
// the oldest entry. Slot buffers are reused, so storing does not allocate
// once the cache is warm.
func (c *ResponseCache) Store(key string, msg *pool.Message) error {
	raw, err := msg.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.slots {
		if c.slots[i].key == key && len(c.slots[i].raw) > 0 {
			return nil // first response wins, as in go-coap's own cache
		}
	}
	if len(c.slots) < c.size {
		c.slots = append(c.slots, cacheSlot{})
		c.next = len(c.slots) - 1
	}
	s := &c.slots[c.next]
	c.next = (c.next + 1) % c.size
	s.key = key
	s.raw = append(s.raw[:0], raw...)
	s.expires = time.Now().Add(udpclient.ExchangeLifetime)
	return nil
}

// CheckExpirations drops entries older than EXCHANGE_LIFETIME.
func (c *ResponseCache) CheckExpirations(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.slots {
		if !now.Before(c.slots[i].expires) {
			c.slots[i].key, c.slots[i].raw = "", c.slots[i].raw[:0]
		}
	}
}

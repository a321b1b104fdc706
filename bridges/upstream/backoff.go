package upstream

import (
	"math/rand/v2"
	"sync"
	"time"
)

// stableAfter is how long a connection must stay up to count as working.
// A broker that accepts the connection and then drops it at once (it is
// shutting down, or refuses what the link sends) is retried with growing
// delays like a broker that cannot be reached, not at once in a loop.
const stableAfter = 30 * time.Second

// backoff decides the wait before each connection attempt. autopaho asks
// for attempt 0 (no wait) after a connection that was up; that alone would
// reconnect a gateway in a tight loop to a broker that drops it right after
// CONNACK, and would bring every gateway of a fleet back in the same
// instant after a broker restart. Here every reconnect waits a jittered
// delay that doubles with each failed attempt and each connection that
// ended before stableAfter, from min up to max; only the very first
// connection is immediate.
type backoff struct {
	min, max time.Duration
	now      func() time.Time
	jitter   func(n int64) int64 // uniform in [0, n)

	mu      sync.Mutex
	first   bool // no attempt made yet
	flaps   int  // connections in a row that ended before stableAfter
	upSince time.Time
}

func newBackoff(min, max time.Duration) *backoff {
	return &backoff{min: min, max: max, now: time.Now, jitter: rand.Int64N, first: true}
}

// delay is autopaho's ReconnectBackoff: the wait before attempt (0 for the
// first attempt after a start or a lost connection).
func (b *backoff) delay(attempt int) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.first {
		b.first = false
		if attempt == 0 {
			return 0
		}
	}
	d := b.min
	for range attempt + b.flaps {
		if d >= b.max/2 {
			d = b.max
			break
		}
		d *= 2
	}
	d = min(d, b.max)
	// "Equal jitter": at least half the delay, so a fleet spreads out but
	// no gateway comes back sooner than half of it.
	return d/2 + time.Duration(b.jitter(int64(d/2)+1))
}

// up records that a connection came up.
func (b *backoff) up() {
	b.mu.Lock()
	b.upSince = b.now()
	b.mu.Unlock()
}

// down records that the connection ended.
func (b *backoff) down() {
	b.mu.Lock()
	if b.now().Sub(b.upSince) < stableAfter {
		b.flaps = min(b.flaps+1, 32)
	} else {
		b.flaps = 0
	}
	b.mu.Unlock()
}

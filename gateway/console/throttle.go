package console

import (
	"sync"
	"time"
)

// ThrottlePolicy sets login rate limiting. After Free failures, each further
// failure locks the key for Base·2^(n-Free), at most Max. Keys are the user
// name and the source address, counted separately, so one source cannot
// try many users and many sources cannot try one user.
type ThrottlePolicy struct {
	FreeUser, FreeSource int
	Base, Max            time.Duration
	// Forget: a key with no failure for this long starts over.
	Forget time.Duration
}

// DefaultThrottle: 5 free failures per user, 20 per source, then 30 s
// doubling to 1 h.
var DefaultThrottle = ThrottlePolicy{FreeUser: 5, FreeSource: 20, Base: 30 * time.Second, Max: time.Hour, Forget: 24 * time.Hour}

type throttleEntry struct {
	fails  int
	last   time.Time
	locked time.Time // until
}

// throttle keeps failure counts in memory, bounded: past maxKeys the
// oldest entries go first. A restart forgets them, which needs physical
// access to the box.
type throttle struct {
	mu      sync.Mutex
	p       ThrottlePolicy
	m       map[string]*throttleEntry
	maxKeys int
}

func newThrottle(p ThrottlePolicy) *throttle {
	return &throttle{p: p, m: map[string]*throttleEntry{}, maxKeys: 10000}
}

// lockedUntil returns when the later of the user's and the source's
// lockouts ends, or zero.
func (t *throttle) lockedUntil(now time.Time, keys ...string) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	var until time.Time
	for _, k := range keys {
		if e := t.m[k]; e != nil && e.locked.After(now) && e.locked.After(until) {
			until = e.locked
		}
	}
	return until
}

func (t *throttle) fail(now time.Time, key string, free int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	if e == nil || now.Sub(e.last) > t.p.Forget {
		if len(t.m) >= t.maxKeys {
			t.evictOldest()
		}
		e = &throttleEntry{}
		t.m[key] = e
	}
	e.fails++
	e.last = now
	if e.fails >= free {
		d := t.p.Base
		for i := free; i < e.fails && d < t.p.Max; i++ {
			d *= 2
		}
		d = min(d, t.p.Max)
		e.locked = now.Add(d)
	}
}

func (t *throttle) evictOldest() {
	var oldest string
	var ot time.Time
	for k, e := range t.m {
		if oldest == "" || e.last.Before(ot) {
			oldest, ot = k, e.last
		}
	}
	delete(t.m, oldest)
}

func (t *throttle) failLogin(now time.Time, user, source string) {
	t.fail(now, "u:"+user, t.p.FreeUser)
	t.fail(now, "s:"+source, t.p.FreeSource)
}

func (t *throttle) reset(keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		delete(t.m, k)
	}
}

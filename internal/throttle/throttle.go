// Package throttle locks out keys (a console user, a source address) after
// repeated failures: from the free-th failure on, each one locks the key
// for Base·2^(n-free), at most Max. Counts are kept in memory, bounded; a
// restart forgets them, which needs physical access to the box.
package throttle

import (
	"sync"
	"time"
)

// Policy sets the lockout's growth. Free is per call to Fail, so that one
// Throttle can hold keys of different kinds (a user, a source).
type Policy struct {
	Base, Max time.Duration
	// Forget: a key with no failure for this long starts over.
	Forget time.Duration
}

type entry struct {
	fails  int
	last   time.Time
	locked time.Time // until
}

// Throttle is safe for concurrent use.
type Throttle struct {
	mu      sync.Mutex
	p       Policy
	m       map[string]*entry
	maxKeys int
}

// New returns a Throttle holding at most maxKeys keys: past it the one
// whose last failure is oldest goes first.
func New(p Policy, maxKeys int) *Throttle {
	return &Throttle{p: p, m: map[string]*entry{}, maxKeys: maxKeys}
}

// LockedUntil returns when the latest of the keys' lockouts ends, or zero.
func (t *Throttle) LockedUntil(now time.Time, keys ...string) time.Time {
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

// Fail counts a failure for key; from the free-th on it locks the key.
func (t *Throttle) Fail(now time.Time, key string, free int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	if e == nil || now.Sub(e.last) > t.p.Forget {
		if e == nil && len(t.m) >= t.maxKeys {
			t.evictOldest()
		}
		e = &entry{}
		t.m[key] = e
	}
	e.fails++
	e.last = now
	if e.fails >= free {
		d := t.p.Base
		for i := free; i < e.fails && d < t.p.Max; i++ {
			d *= 2
		}
		e.locked = now.Add(min(d, t.p.Max))
	}
}

func (t *Throttle) evictOldest() {
	var oldest string
	var ot time.Time
	for k, e := range t.m {
		if oldest == "" || e.last.Before(ot) {
			oldest, ot = k, e.last
		}
	}
	delete(t.m, oldest)
}

// Reset forgets keys (a successful login).
func (t *Throttle) Reset(keys ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range keys {
		delete(t.m, k)
	}
}

// Len is the number of keys held.
func (t *Throttle) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

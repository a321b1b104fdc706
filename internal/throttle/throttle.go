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

// New returns a Throttle holding at most maxKeys keys. Past the bound a
// new key pushes out a key that is not locked: the one with the fewest
// failures, the one whose last failure is oldest among those (see evict
// for when every key is locked).
func New(p Policy, maxKeys int) *Throttle {
	return &Throttle{p: p, m: map[string]*entry{}, maxKeys: maxKeys}
}

// LockedUntil returns when the latest of the keys' lockouts ends, or zero.
// While the Throttle is full of locked keys, a key it does not hold counts
// as locked until the first of those lockouts ends (see evict).
func (t *Throttle) LockedUntil(now time.Time, keys ...string) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	var until time.Time
	for _, k := range keys {
		e := t.m[k]
		if e == nil {
			if full := t.fullUntil(now); full.After(until) {
				until = full
			}
			continue
		}
		if e.locked.After(now) && e.locked.After(until) {
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
		if e == nil && len(t.m) >= t.maxKeys && !t.evict(now) {
			return // full of locked keys: see evict
		}
		e = &entry{}
		t.m[key] = e
	}
	t.count(now, e, free)
}

// FailHeld counts a failure for key only if the Throttle holds it (it
// failed within Forget). A request refused because a key is locked uses
// it: it extends the lockouts it hit, but adds no key, so that refused
// requests, which cost the caller nothing to make, cannot fill the
// Throttle.
func (t *Throttle) FailHeld(now time.Time, key string, free int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.m[key]; e != nil && now.Sub(e.last) <= t.p.Forget {
		t.count(now, e, free)
	}
}

func (t *Throttle) count(now time.Time, e *entry, free int) {
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

// evict deletes one key to make room and reports whether it found one. It
// never takes a locked key: that would lift the lockout, and anyone who
// can make new keys (a new user name per request) could push out the
// lockout of the account they are guessing. It takes a forgotten key
// first (no failure for Forget: it counts nothing any more), else the one
// with the fewest failures, the oldest last failure among those, so that
// keys of one failure each (a flood of made-up names) push out each
// other, not a key with many.
//
// When every key is locked it takes none: the new key is not added, and
// LockedUntil counts every key not held as locked until the first lockout
// ends (fullUntil), when there is room again. Memory stays bounded, and a
// key that cannot be counted does not get unlimited attempts: it waits,
// as a locked one does. That locks out everyone not held, for at most
// Max; filling the Throttle with locked keys takes free failures of each
// of maxKeys keys, each a real attempt (for the console an argon2id run,
// from sources that are themselves counted).
func (t *Throttle) evict(now time.Time) bool {
	var victim string
	var v *entry
	for k, e := range t.m {
		if e.locked.After(now) {
			continue
		}
		if now.Sub(e.last) > t.p.Forget {
			victim, v = k, e
			break
		}
		if v == nil || e.fails < v.fails || e.fails == v.fails && e.last.Before(v.last) {
			victim, v = k, e
		}
	}
	if v == nil {
		return false
	}
	delete(t.m, victim)
	return true
}

// fullUntil returns, when the Throttle is full and every key in it is
// locked, when the first of those lockouts ends; zero otherwise. It scans
// the keys only when the Throttle is full.
func (t *Throttle) fullUntil(now time.Time) time.Time {
	if len(t.m) < t.maxKeys {
		return time.Time{}
	}
	var first time.Time
	for _, e := range t.m {
		if !e.locked.After(now) {
			return time.Time{}
		}
		if first.IsZero() || e.locked.Before(first) {
			first = e.locked
		}
	}
	return first
}

// Failed reports whether key holds a failure not yet forgotten (within
// Forget), locked or not.
func (t *Throttle) Failed(now time.Time, key string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.m[key]
	return e != nil && now.Sub(e.last) <= t.p.Forget
}

// Unlock ends key's lockout, if it has one, and keeps its failures: its
// next failure locks it again, for as long as they all count for. For a
// success from a key several clients share (a source address), where
// Reset would let one that keeps failing start over with each success
// of another, or of its own with a right secret between wrong ones.
func (t *Throttle) Unlock(key string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e := t.m[key]; e != nil {
		e.locked = time.Time{}
	}
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

package mqtt

import (
	"net/netip"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/throttle"
)

// secretLimit decides whether a secret login is checked at all, and counts
// the failed ones, per source address and per IPv6 /64 (SecretLockout).
// What it protects is the gateway's two argon2id slots, which every secret
// device's login needs: a LAN host failing secret logins as fast as it can
// keeps them all busy.
//
// Per address it is a lockout (internal/throttle). An IPv6 host can use any
// of its /64's 2^64 addresses (SLAAC, privacy addresses), so it escaped
// that by taking a new address every Free-1 failures. Locking the /64 out
// as an address is would stop it, but a /64 is a whole link: one failing
// host, or an attacker on purpose, would lock every secret device of its
// link out for up to Max, and again with every further failure. So the /64
// gets a budget instead, a rate limit: PrefixFree failures, one more every
// PrefixEvery. While it is spent, logins from the /64 are refused without
// argon2id, so a rotating host gets one check per PrefixEvery, not the
// slots. An address that has logged in with a secret before (a device
// that proved its secret from it) is held by its own lockout only, not by
// the /64's budget: a host without a device's secret cannot make such an
// address, so it cannot keep out the devices of its /64 that logged in
// before. What it still delays is a device logging in for the first time
// from its address (new, or a new privacy address): that one is refused
// with the attacker's logins and gets through with one of the checks the
// budget allows, or when the attack stops (the refusal says when to
// retry). A success does not refill the /64's budget (one device's success
// says nothing of the other addresses), and failures from a proven address
// spend it like any other. IPv4 is per address only: a host has the
// addresses it was given.
type secretLimit struct {
	p       SecretLockout
	lockout *throttle.Throttle // per address (Addr.String())

	mu sync.Mutex
	// spent is when each /64's budget is full again, for those that
	// failed lately; proven is when each IPv6 address last logged in with
	// a secret. Both hold at most secretLimitKeys, the earliest time
	// dropped first (a /64 whose budget is fullest, the longest-unused
	// address).
	spent  map[netip.Prefix]time.Time
	proven map[netip.Addr]time.Time
}

// secretLimitKeys bounds each of secretLimit's maps (and the throttle's
// addresses), as the console's throttle is bounded.
const secretLimitKeys = 10000

func newSecretLimit(p SecretLockout) *secretLimit {
	return &secretLimit{p: p,
		lockout: throttle.New(throttle.Policy{Base: p.Base, Max: p.Max, Forget: p.Forget}, secretLimitKeys),
		spent:   map[netip.Prefix]time.Time{}, proven: map[netip.Addr]time.Time{}}
}

// gated returns until when a secret login from src is refused unchecked,
// and whether that is its /64's budget (else its address's lockout); zero
// if it is to be checked.
func (s *secretLimit) gated(now time.Time, src bridges.Source) (until time.Time, byPrefix bool) {
	if until := s.lockout.LockedUntil(now, src.Addr.String()); !until.IsZero() {
		return until, false
	}
	if !src.Prefix.IsValid() {
		return time.Time{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.proven[src.Addr]; ok {
		return time.Time{}, false
	}
	// Refused while one more failure would take the budget past
	// PrefixFree, i.e. until it is full again but for PrefixFree-1.
	open := s.spent[src.Prefix].Add(-time.Duration(s.p.PrefixFree-1) * s.p.PrefixEvery)
	if open.After(now) {
		return open, true
	}
	return time.Time{}, false
}

// failed counts a failed secret login from src.
func (s *secretLimit) failed(now time.Time, src bridges.Source) {
	s.lockout.Fail(now, src.Addr.String(), s.p.Free)
	if !src.Prefix.IsValid() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	full, ok := s.spent[src.Prefix]
	if !ok && len(s.spent) >= secretLimitKeys {
		dropEarliest(s.spent)
	}
	s.spent[src.Prefix] = later(full, now).Add(s.p.PrefixEvery)
}

// succeeded counts a successful secret login from src: its address starts
// over, and is not held by its /64's budget from now on.
func (s *secretLimit) succeeded(now time.Time, src bridges.Source) {
	s.lockout.Reset(src.Addr.String())
	if !src.Prefix.IsValid() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.proven[src.Addr]; !ok && len(s.proven) >= secretLimitKeys {
		dropEarliest(s.proven)
	}
	s.proven[src.Addr] = now
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// dropEarliest deletes the key of m with the earliest time. It scans the
// map: it runs only when a map is full, once per failed or successful
// secret login, each of which costs an argon2id run far longer than that.
func dropEarliest[K comparable](m map[K]time.Time) {
	var key K
	var at time.Time
	first := true
	for k, t := range m {
		if first || t.Before(at) {
			key, at, first = k, t, false
		}
	}
	delete(m, key)
}

package mqtt

import (
	"net/netip"
	"slices"
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
// slots. A link-local /64 is counted per interface (bridges.SourcePrefix).
//
// A device's login from an address it logged in from before (with its
// secret, accepted) is held by the address's lockout only, not by the
// /64's budget: a host without the device's secret cannot make such an
// address, so it cannot keep out the devices of its /64 that logged in
// before. The exemption is the device's, not the address's: it holds only
// for a login naming that device (proven maps the address to it), ends at
// the first failed login from the address whatever it names, and with the
// device's revocation (Server.disconnect), and a device has at most
// provenPerDevice addresses, its latest. Before, any login from such an
// address was exempt, for good: a host with one device's secret made up to
// secretLimitKeys of its /64's addresses exempt (pushing out the devices'
// entries), and failed logins from them under any name outside the
// budget, keeping both slots busy, also after the device was revoked.
// What it still delays is a device logging in for the first time from its
// address (new, or a new privacy address): that one is refused with the
// attacker's logins and gets through with one of the checks the budget
// allows, or when the attack stops (the refusal says when to retry). A
// success does not refill the /64's budget (one device's success says
// nothing of the other addresses). IPv4 is per address only: a host has
// the addresses it was given.
type secretLimit struct {
	p       SecretLockout
	lockout *throttle.Throttle // per address (Addr.String())

	mu sync.Mutex
	// spent is when each /64's budget is full again, for those that
	// failed lately (at most secretLimitKeys, the fullest dropped first).
	spent map[bridges.Prefix]time.Time
	// proven is the device that last logged in with its secret from each
	// IPv6 address, and when; byDevice those addresses by device, the
	// latest last (at most provenPerDevice). proven holds at most
	// secretLimitKeys, the longest unused dropped first.
	proven   map[netip.Addr]provenBy
	byDevice map[string][]netip.Addr
}

// provenBy is a device whose secret login from an address was accepted.
type provenBy struct {
	device string
	at     time.Time
}

// secretLimitKeys bounds each of secretLimit's maps (and the throttle's
// addresses), as the console's throttle is bounded.
const secretLimitKeys = 10000

// provenPerDevice is how many addresses (its latest) a device's logins are
// exempt from its /64's budget at: a device moves between a few (a new
// privacy address a day), and one device cannot fill proven.
const provenPerDevice = 4

func newSecretLimit(p SecretLockout) *secretLimit {
	return &secretLimit{p: p,
		lockout: throttle.New(throttle.Policy{Base: p.Base, Max: p.Max, Forget: p.Forget}, secretLimitKeys),
		spent:   map[bridges.Prefix]time.Time{}, proven: map[netip.Addr]provenBy{}, byDevice: map[string][]netip.Addr{}}
}

// gated returns until when a secret login naming device from src is
// refused unchecked, and whether that is its /64's budget (else its
// address's lockout); zero if it is to be checked.
func (s *secretLimit) gated(now time.Time, src bridges.Source, device string) (until time.Time, byPrefix bool) {
	if until := s.lockout.LockedUntil(now, src.Addr.String()); !until.IsZero() {
		return until, false
	}
	if !src.Prefix.IsValid() {
		return time.Time{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.proven[src.Addr]; ok && p.device == device {
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

// failed counts a failed secret login from src, whatever device it named:
// the address is no device's proven one any more.
func (s *secretLimit) failed(now time.Time, src bridges.Source) {
	s.lockout.Fail(now, src.Addr.String(), s.p.Free)
	if !src.Prefix.IsValid() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forgetLocked(src.Addr)
	full, ok := s.spent[src.Prefix]
	if !ok && len(s.spent) >= secretLimitKeys {
		dropEarliest(s.spent)
	}
	s.spent[src.Prefix] = later(full, now).Add(s.p.PrefixEvery)
}

// succeeded counts a secret login of device from src that was accepted:
// a lockout of its address (one that came while the login was checked)
// is lifted, its failures kept, and the address is device's proven one
// from now on (not held by its /64's budget for logins naming device).
// The failures stay because a success says nothing of the other logins
// from the address: when it erased them, 19 wrong secrets and one right
// one from an address, over and over, were never locked out, and kept
// both argon2id slots busy. Only once the connection is accepted
// (Server.accept, under the server's mu, so that a revocation of device
// forgets it after, or refuses the login).
func (s *secretLimit) succeeded(now time.Time, src bridges.Source, device string) {
	s.lockout.Unlock(src.Addr.String())
	if !src.Prefix.IsValid() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forgetLocked(src.Addr)
	if len(s.proven) >= secretLimitKeys {
		var oldest netip.Addr
		var at time.Time
		for a, p := range s.proven { // see dropEarliest
			if !oldest.IsValid() || p.at.Before(at) {
				oldest, at = a, p.at
			}
		}
		s.forgetLocked(oldest)
	}
	addrs := s.byDevice[device]
	if len(addrs) >= provenPerDevice {
		delete(s.proven, addrs[0])
		addrs = slices.Delete(addrs, 0, 1)
	}
	s.proven[src.Addr] = provenBy{device: device, at: now}
	s.byDevice[device] = append(addrs, src.Addr)
}

// revoked forgets device's proven addresses: a revoked device's secret
// proves nothing.
func (s *secretLimit) revoked(device string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.byDevice[device] {
		delete(s.proven, a)
	}
	delete(s.byDevice, device)
}

// forgetLocked takes addr out of proven and its device's addresses.
func (s *secretLimit) forgetLocked(addr netip.Addr) {
	p, ok := s.proven[addr]
	if !ok {
		return
	}
	delete(s.proven, addr)
	addrs := slices.DeleteFunc(s.byDevice[p.device], func(a netip.Addr) bool { return a == addr })
	if len(addrs) == 0 {
		delete(s.byDevice, p.device)
	} else {
		s.byDevice[p.device] = addrs
	}
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

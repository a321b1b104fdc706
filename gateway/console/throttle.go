package console

import (
	"net"
	"net/netip"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	lockout "github.com/bastion-iot/bastion/internal/throttle"
)

// ThrottlePolicy sets login rate limiting. From the Free-th failure on, each
// failure locks the key for Base·2^(n-Free), at most Max. Keys are the user
// name, the source address and, for IPv6, the source's /64, counted
// separately, so one source cannot try many users, many sources cannot try
// one user, and one host cannot escape its source's count by taking
// further addresses of its /64 (SLAAC and privacy extensions let it use
// any of them). The /64 has FreeSource free failures, as an address does.
type ThrottlePolicy struct {
	FreeUser, FreeSource int
	Base, Max            time.Duration
	// Forget: a key with no failure for this long starts over.
	Forget time.Duration
}

// DefaultThrottle: 5 free failures per user, 20 per source (address, and
// IPv6 /64), then 30 s doubling to 1 h.
var DefaultThrottle = ThrottlePolicy{FreeUser: 5, FreeSource: 20, Base: 30 * time.Second, Max: time.Hour, Forget: 24 * time.Hour}

// throttle is the console's: keys "u:"+user, "s:"+source address,
// "p:"+the source's IPv6 /64 (sourceKeys) and the setup and recovery
// pages' own.
type throttle struct {
	*lockout.Throttle
	p ThrottlePolicy
}

// throttleKeys bounds the keys the console's throttle holds. Past it a
// new key pushes out one that is not locked, with the fewest failures
// (internal/throttle).
const throttleKeys = 10000

func newThrottle(p ThrottlePolicy, maxKeys int) *throttle {
	return &throttle{Throttle: lockout.New(lockout.Policy{Base: p.Base, Max: p.Max, Forget: p.Forget}, maxKeys), p: p}
}

// sourceKeys are the throttle keys of a source address (remoteIP: an
// address, for link-local IPv6 with its zone): "s:"+the address and, for
// IPv6, "p:"+its /64, with the zone for a link-local one (as the bridges'
// per-source limits count it: bridges.SourceOf), so that a host rotating
// through the addresses of its /64 is held to the /64's count. An IPv4
// source, or one that does not parse, has only its address key.
func sourceKeys(src string) []string {
	keys := []string{"s:" + src}
	a, err := netip.ParseAddr(src)
	if err != nil {
		return keys
	}
	if p := bridges.SourceOf(net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0))).Prefix; p.IsValid() {
		keys = append(keys, "p:"+p.String())
	}
	return keys
}

// failLogin counts a failed login (or password check) against the user
// and the source's keys.
func (t *throttle) failLogin(now time.Time, user, source string) {
	t.Fail(now, "u:"+user, t.p.FreeUser)
	for _, k := range sourceKeys(source) {
		t.Fail(now, k, t.p.FreeSource)
	}
}

// failLocked counts a login refused because the user or the source is
// locked out, against the keys held only: hammering a locked account or
// from a locked source extends its lockout, but a refused request, which
// costs no argon2id, adds no key. Counted with failLogin, each made-up
// name added a key, and a source locked out could push any lockout out of
// the bounded throttle, the user's it is guessing too, with a flood of
// names.
func (t *throttle) failLocked(now time.Time, user, source string) {
	t.FailHeld(now, "u:"+user, t.p.FreeUser)
	for _, k := range sourceKeys(source) {
		t.FailHeld(now, k, t.p.FreeSource)
	}
}

// loginLockedUntil is when the lockout that refuses a login (or password
// check) of user from source ends, or zero, and whether the user is locked
// out. The source's lockouts refuse it. The user's refuses only a source
// whose address has failed (holds a failure, see Forget): any LAN host can
// lock a user out and keep it locked with one failure an hour, so a
// source with no failure still has its password checked, and the right
// one logs in. What that leaves a guesser with many addresses is in the
// README (Login throttling).
func (t *throttle) loginLockedUntil(now time.Time, user, source string) (until time.Time, userLocked bool) {
	until = t.LockedUntil(now, sourceKeys(source)...)
	u := t.LockedUntil(now, "u:"+user)
	if !u.IsZero() && u.After(until) && t.Failed(now, "s:"+source) {
		until = u
	}
	return until, !u.IsZero()
}

// prefixed is keys, each after prefix.
func prefixed(prefix string, keys []string) []string {
	for i, k := range keys {
		keys[i] = prefix + k
	}
	return keys
}

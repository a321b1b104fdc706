package mqtt

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/netns"
	"github.com/bastion-iot/bastion/pki"
)

// The per-source limits of unauthenticated connections and of failed
// secret logins also count per IPv6 /64: a host on an IPv6 link can use
// any address of the link's /64 (SLAAC, privacy addresses), and with
// limits per address only it escaped both by taking a new address.

// source is the Source of a connection from s.
func source(s string) bridges.Source {
	return bridges.SourceOf(net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(s), 40000)))
}

// rigInNS is newRigWith with the server in a network namespace of its own,
// listening on all its addresses ([::]:0, dual-stack, so IPv4 clients are
// seen as IPv4-mapped addresses), with the addresses cidrs on its loopback
// besides 127.0.0.1 and ::1. in runs fn in the namespace: sockets fn opens
// are in it.
func rigInNS(t *testing.T, name string, cfg Config, id func(*pki.CA) bridges.Identity, cidrs ...string) (r *rig, in func(fn func())) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	ns := netns.New(t, name)
	for _, c := range cidrs {
		ns.AddAddr("lo", c)
	}
	in = func(fn func()) {
		t.Helper()
		if err := ns.Do(func() error { fn(); return nil }); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Listen = "[::]:0"
	in(func() { r = newRigWith(t, queue.Options{}, cfg, id) })
	return r, in
}

// unauthIn reports the listener's unauthenticated connections from prefix.
func (r *rig) unauthIn(prefix string) int {
	r.s.tls.mu.Lock()
	defer r.s.tls.mu.Unlock()
	return r.s.tls.unauthPrefix[netip.MustParsePrefix(prefix)]
}

// tlsListener.admit counts per address, per IPv6 /64 and in all: a host
// that takes a new address of its /64 for every connection is held by the
// /64's bound (refused at once, not by pushing out others' connections
// past the total); IPv4 (IPv4-mapped too) is per address only; past the
// total the oldest is closed.
func TestUnauthLimitPerIPv6Prefix(t *testing.T) {
	const perSource, perPrefix, total = 2, 4, 10
	r := newRigWith(t, queue.Options{}, Config{MaxUnauthPerSource: perSource, MaxUnauthPerPrefix: perPrefix, MaxUnauth: total}, nil)
	l := r.s.tls
	type held struct {
		slot *unauthSlot
		peer net.Conn // the client's end: reads fail once the slot's conn is closed
	}
	var slots []held
	admit := func(from string, want bool) {
		t.Helper()
		c, peer := net.Pipe()
		t.Cleanup(func() { c.Close(); peer.Close() })
		slot, ok := l.admit(c, source(from))
		if ok != want {
			t.Fatalf("admit from %s: %v, want %v (%d unauthenticated)", from, ok, want, l.waiting.Len())
		}
		if !ok {
			if _, err := peer.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrClosedPipe) {
				t.Fatalf("refused connection from %s not closed: %v", from, err)
			}
			return
		}
		slots = append(slots, held{slot, peer})
	}
	before := r.refusals(hub.ReasonHandshakeLimit)
	// One address of fd00:1::/64: its own bound.
	admit("fd00:1::1", true)
	admit("fd00:1::1", true)
	admit("fd00:1::1", false)
	// More addresses of the same /64: the /64's bound, whatever the address.
	admit("fd00:1::2", true)
	admit("fd00:1::3%eth0", true) // a zone does not make another /64
	admit("fd00:1::4", false)
	admit("fd00:1::ffff:1", false)
	// Another /64 has its own room.
	admit("fd00:2::1", true)
	// IPv4: per address, no prefix; a mapped address is the IPv4 one.
	admit("192.0.2.1", true)
	admit("::ffff:192.0.2.1", true)
	admit("192.0.2.1", false)
	if got := r.refusals(hub.ReasonHandshakeLimit) - before; got != 4 {
		t.Errorf("handshake_limit refusals %v, want 4", got)
	}
	// Room in all for three more; the fourth closes the oldest (the first
	// of fd00:1::1) and is admitted, which gives fd00:1::/64 one back.
	admit("192.0.2.2", true)
	admit("192.0.2.3", true)
	admit("192.0.2.4", true)
	admit("192.0.2.5", true)
	if _, err := slots[0].peer.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("oldest connection not closed past the total: %v", err)
	}
	if got := r.unauthIn("fd00:1::/64"); got != perPrefix-1 {
		t.Errorf("fd00:1::/64 holds %d after its oldest was closed, want %d", got, perPrefix-1)
	}
	admit("fd00:1::5", true) // closes the next oldest, fd00:1::1's second
	for _, h := range slots {
		l.release(h.slot)
		l.release(h.slot) // once only
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.waiting.Len() != 0 || len(l.unauth) != 0 || len(l.unauthPrefix) != 0 {
		t.Fatalf("after every release: %d waiting, %d addresses, %d prefixes kept", l.waiting.Len(), len(l.unauth), len(l.unauthPrefix))
	}
}

// TestUnauthenticatedConnectionsLimitedPerIPv6Prefix: connections from
// distinct addresses of one IPv6 /64 that do not authenticate (TCP, then
// nothing) are held to MaxUnauthPerPrefix, though each address is under
// MaxUnauthPerSource; one more from a new address of the /64 is closed at
// once (handshake_limit). Another /64 and IPv4 still connect, and the /64
// gets its room back when its connections go. In a network namespace with
// fd00::2-4/64 and fd01::2/64, the server on [::]:0.
func TestUnauthenticatedConnectionsLimitedPerIPv6Prefix(t *testing.T) {
	r, in := rigInNS(t, "mqtt64", Config{MaxUnauthPerSource: 2, MaxUnauthPerPrefix: 3}, nil,
		"fd00::2/64", "fd00::3/64", "fd00::4/64", "fd01::2/64")
	idle := func(from string) net.Conn {
		t.Helper()
		var c net.Conn
		in(func() {
			d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
			var err error
			if c, err = d.Dial("tcp", r.addrFrom(from)); err != nil {
				t.Fatal(err)
			}
		})
		t.Cleanup(func() { c.Close() })
		return c
	}
	var held []net.Conn
	for _, from := range []string{"fd00::2", "fd00::2", "fd00::3"} {
		held = append(held, idle(from))
	}
	waitFor(t, "3 unauthenticated connections from fd00::/64", func() bool { return r.unauthIn("fd00::/64") == 3 })
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 0 {
		t.Fatalf("handshake_limit refusals %v within the bounds", got)
	}

	// A fresh address of the /64 has room of its own, not the /64's.
	in(func() { closedAtOnce(t, r, "fd00::4") })
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v, want 1", got)
	}

	// Another /64, and IPv4 (seen as ::ffff:127.0.0.1), are not held.
	idle("fd01::2")
	waitFor(t, "the connection from fd01::2", func() bool { return r.unauthIn("fd01::/64") == 1 })
	for from, dev := range map[string]string{"fd01::2": "dev-b", "127.0.0.1": "dev-c"} {
		r.from = from
		in(func() { r.dial(t, dev, 5) })
	}

	// The /64's connections go: its room comes back.
	for _, c := range held {
		c.Close()
	}
	waitFor(t, "fd00::/64's slots back", func() bool { return r.unauthIn("fd00::/64") == 0 })
	r.from = "fd00::4"
	in(func() { r.dial(t, "dev-d", 5) })
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v at the end, want 1", got)
	}
}

// secretLimit: the per-address lockout as before; the addresses of one
// IPv6 /64 share a budget of PrefixFree failures, one more every
// PrefixEvery, past which logins from the /64 are refused unchecked,
// except from an address with a successful login; another /64 and IPv4
// have their own.
func TestSecretLimitPerIPv6Prefix(t *testing.T) {
	p := SecretLockout{Free: 3, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour, PrefixFree: 5, PrefixEvery: time.Minute}
	s := newSecretLimit(p)
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	gated := func(from string, want time.Duration, wantPrefix bool) {
		t.Helper()
		until, byPrefix := s.gated(now, source(from))
		var got time.Duration
		if !until.IsZero() {
			got = until.Sub(now)
		}
		if got != want || byPrefix != wantPrefix {
			t.Fatalf("gated(%s) = %v (by prefix %v), want %v (by prefix %v)", from, got, byPrefix, want, wantPrefix)
		}
	}
	s.succeeded(now, source("fd00:1::99"))
	for range 3 {
		gated("fd00:1::1", 0, false)
		s.failed(now, source("fd00:1::1"))
	}
	gated("fd00:1::1", 30*time.Second, false) // its own lockout first
	s.failed(now, source("fd00:1::2"))
	gated("fd00:1::3%eth0", 0, false) // four failures in the /64: a fifth is allowed
	s.failed(now, source("fd00:1::3%eth0"))
	// Five: the /64's budget is spent for a minute (one comes back per
	// minute), whatever the address.
	gated("fd00:1::4", time.Minute, true)
	gated("fd00:1::ffff:ffff", time.Minute, true)
	gated("fd00:1::99", 0, false) // logged in before: not held by the /64
	gated("fd00:2::1", 0, false)
	gated("192.0.2.1", 0, false)
	// IPv4 has no /64 budget: per address only, a mapped address the
	// IPv4 one.
	for i := range 10 {
		s.failed(now, source(fmt.Sprint("192.0.2.", 10+i)))
	}
	s.failed(now, source("::ffff:192.0.2.1"))
	s.failed(now, source("192.0.2.1"))
	gated("192.0.2.1", 0, false)
	s.failed(now, source("192.0.2.1"))
	gated("192.0.2.1", 30*time.Second, false)
	gated("192.0.2.2", 0, false)

	// A minute on: one check's worth; a failure spends it again.
	now = now.Add(time.Minute)
	gated("fd00:1::4", 0, false)
	s.failed(now, source("fd00:1::4"))
	gated("fd00:1::5", time.Minute, true)
	// A success from a new address does not refill the /64's budget, and
	// exempts that address from then on.
	s.succeeded(now, source("fd00:1::5"))
	gated("fd00:1::6", time.Minute, true)
	gated("fd00:1::5", 0, false)
	// Failures from an exempt address still spend the budget and count
	// towards its own lockout.
	for range 3 {
		s.failed(now, source("fd00:1::99"))
	}
	gated("fd00:1::99", 30*time.Second, false)
	gated("fd00:1::6", 4*time.Minute, true)

	// The /64's budgets held are bounded: past secretLimitKeys the one
	// fullest again soonest is dropped.
	for i := range secretLimitKeys {
		s.failed(now.Add(time.Duration(i)*time.Millisecond), source(fmt.Sprintf("fd01:%x::1", i)))
	}
	if n := len(s.spent); n != secretLimitKeys {
		t.Errorf("%d /64s held, want the bound %d", n, secretLimitKeys)
	}
	if _, ok := s.spent[netip.MustParsePrefix("fd00:1::/64")]; !ok {
		t.Error("the most spent /64 was dropped")
	}
	if _, ok := s.spent[netip.MustParsePrefix("fd01:0::/64")]; ok {
		t.Error("the least spent /64 was kept past the bound")
	}
}

// TestSecretLockoutPerIPv6Prefix: failed secret logins from rotating
// addresses of one IPv6 /64 spend the /64's budget (PrefixFree, one more
// per PrefixEvery); then a login from a new address of the /64 is refused
// without a secret check (MQTT 5 0x9F, secret_lockout), while an address
// of the /64 that logged in before, another /64 and IPv4 log in. In a
// network namespace with fd00::2-6/64 and fd01::2/64, the server on
// [::]:0.
func TestSecretLockoutPerIPv6Prefix(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	var checks atomic.Int32
	r, in := rigInNS(t, "mqtt64lock", Config{AllowSecretAuth: true, Now: clock,
		SecretLockout: SecretLockout{Free: 3, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour, PrefixFree: 5, PrefixEvery: time.Minute}},
		func(ca *pki.CA) bridges.Identity { return countingIdentity{caIdentity{ca}, &checks} },
		"fd00::2/64", "fd00::3/64", "fd00::4/64", "fd00::5/64", "fd00::6/64", "fd01::2/64")
	bad, gated := packets.ErrBadUsernameOrPassword.Code, packets.ErrConnectionRateExceeded.Code
	steps := []struct {
		from, secret string
		want         byte
		checks       int32 // secret checks (argon2id) run so far
	}{
		{"fd00::5", "s3cret", 0, 1}, // a device of the /64, before the attack
		{"fd00::2", "wrong", bad, 2},
		{"fd00::2", "wrong", bad, 3},
		{"fd00::2", "wrong", bad, 4},
		{"fd00::2", "s3cret", gated, 4}, // its address's lockout
		{"fd00::3", "wrong", bad, 5},    // a new address of the /64
		{"fd00::3", "wrong", bad, 6},    // the /64's fifth failure
		{"fd00::4", "s3cret", gated, 6}, // no failure of its own: the /64's budget
		{"fd00::6", "wrong", gated, 6},
		{"fd00::5", "s3cret", 0, 7},   // logged in from there before: not held by the /64
		{"fd01::2", "s3cret", 0, 8},   // another /64
		{"127.0.0.1", "s3cret", 0, 9}, // IPv4
	}
	login := func(from, secret string) (got byte) {
		t.Helper()
		in(func() { got = secretLogin(t, r, 5, from, secret) })
		return got
	}
	for i, st := range steps {
		if got := login(st.from, st.secret); got != st.want {
			t.Fatalf("step %d, %q from %s: CONNACK 0x%02x, want 0x%02x", i, st.secret, st.from, got, st.want)
		}
		if n := checks.Load(); n != st.checks {
			t.Fatalf("step %d, %q from %s: %d secret checks, want %d", i, st.secret, st.from, n, st.checks)
		}
	}
	if got := r.refusals(hub.ReasonSecretLockout); got != 3 {
		t.Errorf("secret_lockout refusals %v, want 3", got)
	}
	// A minute on, the /64 has one check's worth; a failure spends it.
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if got := login("fd00::4", "wrong"); got != bad {
		t.Fatalf("a minute later, wrong secret from fd00::4: CONNACK 0x%02x, want 0x%02x", got, bad)
	}
	if got := login("fd00::6", "s3cret"); got != gated {
		t.Fatalf("the budget spent again, right secret from fd00::6: CONNACK 0x%02x, want 0x%02x", got, gated)
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if got := login("fd00::6", "s3cret"); got != 0 {
		t.Fatalf("another minute later, right secret from fd00::6: CONNACK 0x%02x, want 0", got)
	}
	if n := checks.Load(); n != 11 {
		t.Errorf("%d secret checks, want 11", n)
	}
}

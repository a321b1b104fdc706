package mqtt

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
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

// unauthIn reports the listener's unauthenticated connections from prefix
// ("fe80::/64%eth0": with a zone).
func (r *rig) unauthIn(prefix string) int {
	p, zone, _ := strings.Cut(prefix, "%")
	return r.s.tls.limit.In(bridges.Prefix{Net: netip.MustParsePrefix(p), Zone: zone})
}

// tlsListener.admit counts per address, per IPv6 /64 and in all: over its
// address's bound a connection is refused; a host that takes a new
// address of its /64 for every connection is held by the /64's bound,
// past which the /64's oldest unauthenticated connection is closed to
// make room (not the new one refused: that let one host holding its /64's
// slots keep out every other device of the /64); a link-local /64 is one
// per interface; IPv4 (IPv4-mapped too) is per address only; past the
// total the oldest of all is closed.
func TestUnauthLimitPerIPv6Prefix(t *testing.T) {
	const perSource, perPrefix, total = 2, 4, 13
	r := newRigWith(t, queue.Options{}, Config{MaxUnauthPerSource: perSource, MaxUnauthPerPrefix: perPrefix, MaxUnauth: total}, nil)
	l := r.s.tls
	type held struct {
		from string
		slot *unauthSlot
		peer net.Conn // the client's end: reads fail once the slot's conn is closed
	}
	var slots []held
	closed := func(peer net.Conn) bool {
		peer.SetReadDeadline(time.Now().Add(time.Second))
		_, err := peer.Read(make([]byte, 1))
		return errors.Is(err, io.EOF) || errors.Is(err, io.ErrClosedPipe)
	}
	released := func(s *unauthSlot) bool { return !l.limit.Held(s) }
	// admit admits a connection from from and checks which of those
	// held so far are closed now (by their index in slots): their slots
	// given back and their connections closed.
	admit := func(from string, want bool, closedNow ...int) {
		t.Helper()
		open := map[int]bool{}
		for i, h := range slots {
			if !released(h.slot) {
				open[i] = true
			}
		}
		c, peer := net.Pipe()
		t.Cleanup(func() { c.Close(); peer.Close() })
		slot, ok := l.admit(c, source(from))
		if ok != want {
			t.Fatalf("admit from %s: %v, want %v (%d unauthenticated)", from, ok, want, l.limit.Len())
		}
		if !ok {
			if !closed(peer) {
				t.Fatalf("refused connection from %s not closed", from)
			}
		} else {
			slots = append(slots, held{from, slot, peer})
		}
		for i := range open {
			want := slices.Contains(closedNow, i)
			if got := released(slots[i].slot); got != want {
				t.Fatalf("admit from %s: connection %d (from %s) given up its slot: %v, want %v", from, i, slots[i].from, got, want)
			}
			if want && !closed(slots[i].peer) {
				t.Fatalf("admit from %s: connection %d (from %s) not closed with its slot", from, i, slots[i].from)
			}
		}
	}
	before := r.refusals(hub.ReasonHandshakeLimit)
	// One address of fd00:1::/64: its own bound, refused past it.
	admit("fd00:1::1", true)
	admit("fd00:1::1", true)
	admit("fd00:1::1", false)
	// More addresses of the same /64, up to its bound.
	admit("fd00:1::2", true)
	admit("fd00:1::3%eth0", true) // a zone does not make another /64 but link-local
	// Past it, whatever the address: admitted, the /64's oldest closed.
	admit("fd00:1::4", true, 0)
	admit("fd00:1::ffff:1", true, 1)
	admit("fd00:1::1", true, 2) // fd00:1::1 has room again
	if got := r.unauthIn("fd00:1::/64"); got != perPrefix {
		t.Errorf("fd00:1::/64 holds %d, want its bound %d", got, perPrefix)
	}
	// Another /64 has its own room; so has each interface's link-local
	// /64.
	admit("fd00:2::1", true)
	for i := range perPrefix {
		admit(fmt.Sprintf("fe80::%x%%eth0", i+1), true)
	}
	admit("fe80::1%eth1", true) // eth0's is full, eth1's is not: nothing closed
	if got := r.unauthIn("fe80::/64%eth0"); got != perPrefix {
		t.Errorf("fe80::/64%%eth0 holds %d, want %d", got, perPrefix)
	}
	// IPv4: per address, no prefix; a mapped address is the IPv4 one.
	admit("192.0.2.1", true)
	admit("::ffff:192.0.2.1", true)
	admit("192.0.2.1", false)
	if got := r.refusals(hub.ReasonHandshakeLimit) - before; got != 5 {
		t.Errorf("handshake_limit refusals %v, want 5 (2 refused, 3 closed)", got)
	}
	// Room in all for one more; the next closes the oldest of all (the
	// first of fd00:1::3), which gives fd00:1::/64 one back.
	if n := l.limit.Len(); n != total-1 {
		t.Fatalf("%d unauthenticated, want %d", n, total-1)
	}
	admit("192.0.2.2", true)
	admit("192.0.2.3", true, 3)
	if got := r.unauthIn("fd00:1::/64"); got != perPrefix-1 {
		t.Errorf("fd00:1::/64 holds %d after its oldest was closed, want %d", got, perPrefix-1)
	}
	admit("fd00:1::5", true, 4) // the total's oldest, fd00:1::4's
	for _, h := range slots {
		l.limit.Release(h.slot)
		l.limit.Release(h.slot) // once only
	}
	if addrs, prefixes := l.limit.Tracked(); l.limit.Len() != 0 || addrs != 0 || prefixes != 0 {
		t.Fatalf("after every release: %d waiting, %d addresses, %d prefixes kept", l.limit.Len(), addrs, prefixes)
	}
}

// TestUnauthenticatedConnectionsLimitedPerIPv6Prefix: connections from
// distinct addresses of one IPv6 /64 that do not authenticate (TCP, then
// nothing) are held to MaxUnauthPerPrefix, though each address is under
// MaxUnauthPerSource; a device from another address of the /64 then
// connects and authenticates (TLS and CONNECT), the /64's oldest idle
// connection closed to make room for it, not the device refused as
// before (one host's idle connections kept out every device of its /64).
// One more from an address at its own bound is closed at once. Another
// /64 and IPv4 are not held. In a network namespace with fd00::2-5/64 and
// fd01::2/64, the server on [::]:0.
func TestUnauthenticatedConnectionsLimitedPerIPv6Prefix(t *testing.T) {
	r, in := rigInNS(t, "mqtt64", Config{MaxUnauthPerSource: 2, MaxUnauthPerPrefix: 3}, nil,
		"fd00::2/64", "fd00::3/64", "fd00::4/64", "fd00::5/64", "fd01::2/64")
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
	// closedBy reports whether the server closed c within d.
	closedBy := func(c net.Conn, d time.Duration) bool {
		c.SetReadDeadline(time.Now().Add(d))
		_, err := c.Read(make([]byte, 1))
		return err != nil && !isTimeout(err)
	}
	var held []net.Conn
	for _, from := range []string{"fd00::2", "fd00::2", "fd00::3"} {
		held = append(held, idle(from))
	}
	waitFor(t, "3 unauthenticated connections from fd00::/64", func() bool { return r.unauthIn("fd00::/64") == 3 })
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 0 {
		t.Fatalf("handshake_limit refusals %v within the bounds", got)
	}
	// Over its address's bound: closed at once, nothing else.
	in(func() { closedAtOnce(t, r, "fd00::2") })
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v, want 1", got)
	}

	// A device of the /64 connects; the oldest idle one is closed.
	r.from = "fd00::4"
	in(func() { r.dial(t, "dev-a", 5) })
	if !closedBy(held[0], 5*time.Second) {
		t.Fatal("the /64's oldest idle connection is still open after a device of the /64 connected")
	}
	for _, c := range held[1:] {
		if closedBy(c, 50*time.Millisecond) {
			t.Fatal("an idle connection other than the /64's oldest was closed")
		}
	}

	// Another /64, and IPv4 (seen as ::ffff:127.0.0.1), are not held.
	idle("fd01::2")
	waitFor(t, "the connection from fd01::2", func() bool { return r.unauthIn("fd01::/64") == 1 })
	for from, dev := range map[string]string{"fd01::2": "dev-b", "127.0.0.1": "dev-c"} {
		r.from = from
		in(func() { r.dial(t, dev, 5) })
	}

	// The /64 full again; the next device closes the next oldest,
	// fd00::2's second.
	held = append(held, idle("fd00::3"))
	waitFor(t, "fd00::/64 full again", func() bool { return r.unauthIn("fd00::/64") == 3 })
	r.from = "fd00::5"
	in(func() { r.dial(t, "dev-d", 5) })
	if !closedBy(held[1], 5*time.Second) {
		t.Fatal("the /64's oldest idle connection is still open after a second device of the /64 connected")
	}
	for _, c := range held[2:] {
		if closedBy(c, 50*time.Millisecond) {
			t.Fatal("an idle connection other than the /64's oldest was closed")
		}
	}
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 3 {
		t.Errorf("handshake_limit refusals %v at the end, want 3 (1 refused, 2 closed)", got)
	}
}

// secretLimit: the per-address lockout as before; the addresses of one
// IPv6 /64 (a link-local one per interface) share a budget of PrefixFree
// failures, one more every PrefixEvery, past which logins from the /64
// are refused unchecked, except a device's login from an address it
// logged in from before (one of its last provenPerDevice); another /64
// and IPv4 have their own. The exemption is the device's: not for a
// login naming another device, gone at the first failure from the
// address and with the device's revocation.
func TestSecretLimitPerIPv6Prefix(t *testing.T) {
	p := SecretLockout{Free: 3, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour, PrefixFree: 5, PrefixEvery: time.Minute}
	s := newSecretLimit(p)
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	gated := func(from, device string, want time.Duration, wantPrefix bool) {
		t.Helper()
		until, byPrefix := s.gated(now, source(from), device)
		var got time.Duration
		if !until.IsZero() {
			got = until.Sub(now)
		}
		if got != want || byPrefix != wantPrefix {
			t.Fatalf("gated(%s, %s) = %v (by prefix %v), want %v (by prefix %v)", from, device, got, byPrefix, want, wantPrefix)
		}
	}
	s.succeeded(now, source("fd00:1::99"), "deva")
	for range 3 {
		gated("fd00:1::1", "deva", 0, false)
		s.failed(now, source("fd00:1::1"))
	}
	gated("fd00:1::1", "deva", 30*time.Second, false) // its own lockout first
	s.failed(now, source("fd00:1::2"))
	gated("fd00:1::3%eth0", "deva", 0, false) // four failures in the /64: a fifth is allowed
	s.failed(now, source("fd00:1::3%eth0"))
	// Five: the /64's budget is spent for a minute (one comes back per
	// minute), whatever the address.
	gated("fd00:1::4", "deva", time.Minute, true)
	gated("fd00:1::ffff:ffff", "deva", time.Minute, true)
	gated("fd00:1::99", "deva", 0, false)          // deva logged in from there before
	gated("fd00:1::99", "devb", time.Minute, true) // not another device
	gated("fd00:2::1", "deva", 0, false)
	gated("192.0.2.1", "deva", 0, false)
	// IPv4 has no /64 budget: per address only, a mapped address the
	// IPv4 one.
	for i := range 10 {
		s.failed(now, source(fmt.Sprint("192.0.2.", 10+i)))
	}
	s.failed(now, source("::ffff:192.0.2.1"))
	s.failed(now, source("192.0.2.1"))
	gated("192.0.2.1", "deva", 0, false)
	s.failed(now, source("192.0.2.1"))
	gated("192.0.2.1", "deva", 30*time.Second, false)
	gated("192.0.2.2", "deva", 0, false)
	// Link-local: one budget per interface.
	for i := range 5 {
		s.failed(now, source(fmt.Sprintf("fe80::%x%%eth0", i+1)))
	}
	gated("fe80::99%eth0", "deva", time.Minute, true)
	gated("fe80::99%eth1", "deva", 0, false)

	// A minute on: one check's worth; a failure spends it again.
	now = now.Add(time.Minute)
	gated("fd00:1::4", "deva", 0, false)
	s.failed(now, source("fd00:1::4"))
	gated("fd00:1::5", "devb", time.Minute, true)
	// A success from a new address does not refill the /64's budget, and
	// exempts that address for its device from then on.
	s.succeeded(now, source("fd00:1::5"), "devb")
	gated("fd00:1::6", "devb", time.Minute, true)
	gated("fd00:1::5", "devb", 0, false)
	gated("fd00:1::5", "deva", time.Minute, true)
	// A failure from an exempt address, whatever it names, ends the
	// exemption there and spends the budget.
	s.failed(now, source("fd00:1::99"))
	gated("fd00:1::99", "deva", 2*time.Minute, true)
	// A revoked device's addresses are exempt no more.
	s.revoked("devb")
	gated("fd00:1::5", "devb", 2*time.Minute, true)
	if len(s.proven) != 0 || len(s.byDevice) != 0 {
		t.Fatalf("proven addresses kept: %v, %v", s.proven, s.byDevice)
	}

	// A device is exempt at its last provenPerDevice addresses only, and
	// an address at most for the device that last logged in from it.
	for i := range 6 {
		s.succeeded(now, source(fmt.Sprintf("fd00:5::%x", i+1)), "devc")
	}
	s.succeeded(now, source("fd00:5::77"), "devd")
	for range 5 {
		s.failed(now, source("fd00:5::ff"))
	}
	for i := range 6 {
		if i < 6-provenPerDevice {
			gated(fmt.Sprintf("fd00:5::%x", i+1), "devc", time.Minute, true)
		} else {
			gated(fmt.Sprintf("fd00:5::%x", i+1), "devc", 0, false)
		}
	}
	gated("fd00:5::77", "devd", 0, false) // not pushed out by devc's
	s.succeeded(now, source("fd00:5::6"), "devd")
	gated("fd00:5::6", "devd", 0, false)
	gated("fd00:5::6", "devc", time.Minute, true)
	if got := len(s.byDevice["devc"]); got != provenPerDevice-1 {
		t.Errorf("devc has %d proven addresses after one went to devd, want %d", got, provenPerDevice-1)
	}

	// The proven addresses held are bounded: past secretLimitKeys the
	// longest unused is dropped.
	for i := range secretLimitKeys {
		s.succeeded(now.Add(time.Duration(i+1)*time.Millisecond), source(fmt.Sprintf("fd02:%x::1", i)), fmt.Sprint("dev", i))
	}
	if n := len(s.proven); n != secretLimitKeys {
		t.Errorf("%d proven addresses held, want the bound %d", n, secretLimitKeys)
	}
	if _, ok := s.proven[netip.MustParseAddr("fd02:0::1")]; !ok {
		t.Error("a newer proven address was dropped before the older ones")
	}
	if _, ok := s.proven[netip.MustParseAddr("fd00:5::77")]; ok {
		t.Error("the longest unused proven address was kept past the bound")
	}

	// The /64's budgets held are bounded: past secretLimitKeys the one
	// fullest again soonest is dropped.
	for i := range secretLimitKeys {
		s.failed(now.Add(time.Duration(i)*time.Millisecond), source(fmt.Sprintf("fd01:%x::1", i)))
	}
	if n := len(s.spent); n != secretLimitKeys {
		t.Errorf("%d /64s held, want the bound %d", n, secretLimitKeys)
	}
	if _, ok := s.spent[source("fd00:1::1").Prefix]; !ok {
		t.Error("the most spent /64 was dropped")
	}
	if _, ok := s.spent[source("fd01:0::1").Prefix]; ok {
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

// revocableIdentity is countingIdentity that refuses a device revoked in
// the rig's CA before counting a check (as the gateway refuses one before
// argon2id) and tells the server of revocations.
type revocableIdentity struct{ countingIdentity }

func (i revocableIdentity) OnRevoke(f func(string)) { i.ca.Revocations().Subscribe(f) }

func (i revocableIdentity) CheckSecret(device string, secret []byte) error {
	if i.ca.Revocations().Revoked(device, "") {
		return fmt.Errorf("device %s: %w", device, pki.ErrRevoked)
	}
	return i.countingIdentity.CheckSecret(device, secret)
}

// TestSecretExemptionIsTheDevices: an address a device logged in from is
// exempt from its /64's budget of failed secret logins only for logins
// naming that device, only for the device's last 4 addresses, until a
// login from it fails, until the device is revoked, and only once a login
// was accepted (not one refused after its secret was checked). Before, any
// login from such an address was exempt for good: a host with one
// device's secret logged in from many addresses of its /64, and failed
// logins under any name from them outside the budget, also after the
// device was revoked. In a network namespace with fd00::2-9/64.
func TestSecretExemptionIsTheDevices(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var checks atomic.Int32
	var addrs []string
	for i := 2; i <= 9; i++ {
		addrs = append(addrs, fmt.Sprintf("fd00::%d/64", i))
	}
	r, in := rigInNS(t, "mqtt64proven", Config{AllowSecretAuth: true, Now: func() time.Time { return now },
		SecretLockout: SecretLockout{Free: 10, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour, PrefixFree: 2, PrefixEvery: time.Hour}},
		func(ca *pki.CA) bridges.Identity { return revocableIdentity{countingIdentity{caIdentity{ca}, &checks}} }, addrs...)
	bad, gated := packets.ErrBadUsernameOrPassword.Code, packets.ErrConnectionRateExceeded.Code
	steps := []struct {
		what                       string
		from, clientID, user, pass string
		want                       byte
		checked                    bool // a secret check ran
	}{
		{"devs from its 1st address", "fd00::2", "devs", "devs", "s3cret", 0, true},
		{"devs from its 2nd address", "fd00::3", "devs", "devs", "s3cret", 0, true},
		{"devs from its 3rd address", "fd00::4", "devs", "devs", "s3cret", 0, true},
		{"devs from its 4th address", "fd00::5", "devs", "devs", "s3cret", 0, true},
		{"devs from its 5th address", "fd00::6", "devs", "devs", "s3cret", 0, true},
		{"devs from its 6th address", "fd00::7", "devs", "devs", "s3cret", 0, true},
		{"devs's secret, another client id: refused after the check", "fd00::8", "other", "devs", "s3cret", bad, true},
		{"a failure spending the /64's budget", "fd00::9", "other", "other", "wrong", bad, true},
		{"a failure spending the /64's budget", "fd00::9", "other", "other", "wrong", bad, true},
		{"another name from devs's address", "fd00::7", "other", "other", "wrong", gated, false},
		{"another name from devs's address", "fd00::4", "x", "x", "wrong", gated, false},
		{"devs from an address past its last 4", "fd00::2", "devs", "devs", "s3cret", gated, false},
		{"devs from the address of its refused login", "fd00::8", "devs", "devs", "s3cret", gated, false},
		{"devs from one of its last 4", "fd00::7", "devs", "devs", "s3cret", 0, true},
		{"a failure naming devs from its address", "fd00::6", "devs", "devs", "wrong", bad, true},
		{"devs from the address that failed", "fd00::6", "devs", "devs", "s3cret", gated, false},
		{"devs from one of its last 4", "fd00::5", "devs", "devs", "s3cret", 0, true},
	}
	run := func(i int, what, from, clientID, user, pass string, want byte, checked bool) {
		t.Helper()
		before := checks.Load()
		var got byte
		in(func() { got = secretLoginAs(t, r, 5, from, clientID, user, pass) })
		if got != want {
			t.Fatalf("step %d, %s (%s as %s/%s, %q): CONNACK 0x%02x, want 0x%02x", i, what, from, clientID, user, pass, got, want)
		}
		if ran := checks.Load() != before; ran != checked {
			t.Fatalf("step %d, %s: secret checked %v, want %v", i, what, ran, checked)
		}
	}
	for i, st := range steps {
		run(i, st.what, st.from, st.clientID, st.user, st.pass, st.want, st.checked)
	}
	// Revoked: its addresses are exempt no more, also for its own name
	// (before, such a login was not held by the /64's budget: refused
	// as revoked, not as secret_lockout).
	r.ca.Revocations().RevokeDevice("devs")
	run(len(steps), "revoked devs from one of its last 4", "fd00::5", "devs", "devs", "s3cret", gated, false)
	r.s.secrets.mu.Lock()
	defer r.s.secrets.mu.Unlock()
	if len(r.s.secrets.proven) != 0 || len(r.s.secrets.byDevice) != 0 {
		t.Errorf("proven addresses kept after the revocation: %v", r.s.secrets.proven)
	}
}

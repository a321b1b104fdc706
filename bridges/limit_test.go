package bridges

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// limitRig takes slots named by their source address in a SourceLimit of
// strings (each slot's Value is its name: "fd00::1#2" is the second from
// fd00::1) and checks what each Take did.
type limitRig struct {
	t     *testing.T
	l     *SourceLimit[string]
	n     map[string]int
	slots map[string]*Slot[string]
}

func newLimitRig(t *testing.T, perSource, perPrefix, total int) *limitRig {
	return &limitRig{t: t, l: NewSourceLimit[string](perSource, perPrefix, total), n: map[string]int{}, slots: map[string]*Slot[string]{}}
}

// src is the Source of a UDP datagram from addr, as the transports see it.
func src(addr string) Source {
	return SourceOf(net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(addr), 5684)))
}

// take takes a slot from addr and fails unless Take reports ok as wantOK
// and evicts the slot named wantEvicted ("" for none) by the bound wantBy.
// It returns the new slot's name.
func (r *limitRig) take(addr string, wantOK bool, wantEvicted string, wantBy Bound) string {
	r.t.Helper()
	r.n[addr]++
	name := fmt.Sprintf("%s#%d", addr, r.n[addr])
	s := NewSlot(src(addr), name)
	ok, ev, by := r.l.Take(s)
	var got string
	if ev != nil {
		got = ev.Value()
	}
	if ok != wantOK || got != wantEvicted || by != wantBy {
		r.t.Fatalf("take %s: ok %v, evicted %q by %v; want ok %v, evicted %q by %v", name, ok, got, by, wantOK, wantEvicted, wantBy)
	}
	if r.l.Held(s) != ok {
		r.t.Fatalf("take %s: held %v after Take said %v", name, r.l.Held(s), ok)
	}
	if ev != nil {
		if r.l.Held(ev) || r.l.EvictedBy(ev) != wantBy {
			r.t.Fatalf("evicted %s: held %v, evicted by %v; want released, by %v", got, r.l.Held(ev), r.l.EvictedBy(ev), wantBy)
		}
	}
	r.slots[name] = s
	return name
}

// Over its address's bound a new slot is refused and nothing is evicted:
// that address is the host itself.
func TestSourceLimitRefusesOverTheAddressBound(t *testing.T) {
	r := newLimitRig(t, 2, 10, 10)
	r.take("fd00::1", true, "", BoundNone)
	r.take("fd00::1", true, "", BoundNone)
	r.take("fd00::1", false, "", BoundNone)
	r.take("192.0.2.1", true, "", BoundNone)
	r.take("::ffff:192.0.2.1", true, "", BoundNone) // the IPv4 address it maps
	r.take("192.0.2.1", false, "", BoundNone)
	if got := r.l.From(netip.MustParseAddr("fd00::1")); got != 2 {
		t.Errorf("fd00::1 holds %d, want its bound 2", got)
	}
	if diff := cmp.Diff([]string{"fd00::1#1", "fd00::1#2", "192.0.2.1#1", "::ffff:192.0.2.1#1"}, r.l.Values()); diff != "" {
		t.Errorf("held (-want +got):\n%s", diff)
	}
	// A refused slot holds nothing: its Release gives back nothing.
	if r.l.Release(r.slots["fd00::1#3"]) {
		t.Error("a refused slot's Release says it was evicted")
	}
	if n := r.l.Len(); n != 4 {
		t.Errorf("%d held after a refused slot's Release, want 4", n)
	}
}

// Over its /64's bound, whatever the address of the /64, the /64's oldest
// slot is evicted for the new one, oldest first, and the /64 holds its
// bound; another /64 has room of its own, and each interface's link-local
// /64 is one of its own.
func TestSourceLimitEvictsTheOldestOfTheIPv6Prefix(t *testing.T) {
	r := newLimitRig(t, 2, 3, 100)
	r.take("fd00:1::1", true, "", BoundNone)
	r.take("fd00:2::1", true, "", BoundNone)
	r.take("fd00:1::2", true, "", BoundNone)
	r.take("fd00:1::3%eth0", true, "", BoundNone) // a zone makes no other /64 but link-local
	r.take("fd00:1::4", true, "fd00:1::1#1", BoundPrefix)
	r.take("fd00:1::ffff:1", true, "fd00:1::2#1", BoundPrefix)
	r.take("fd00:1::1", true, "fd00:1::3%eth0#1", BoundPrefix) // room again at fd00:1::1
	if got := r.l.In(src("fd00:1::9").Prefix); got != 3 {
		t.Errorf("fd00:1::/64 holds %d, want its bound 3", got)
	}
	for i := range 3 {
		r.take(fmt.Sprintf("fe80::%x%%eth0", i+1), true, "", BoundNone)
	}
	r.take("fe80::1%eth1", true, "", BoundNone) // eth0's fe80::/64 is full, eth1's is not
	r.take("fe80::9%eth0", true, "fe80::1%eth0#1", BoundPrefix)
	if diff := cmp.Diff([]string{"fd00:2::1#1", "fd00:1::4#1", "fd00:1::ffff:1#1", "fd00:1::1#2",
		"fe80::2%eth0#1", "fe80::3%eth0#1", "fe80::1%eth1#1", "fe80::9%eth0#1"}, r.l.Values()); diff != "" {
		t.Errorf("held (-want +got):\n%s", diff)
	}
}

// The /64's bound never applies to IPv4: addresses of one IPv4 /24 (and
// IPv4-mapped ones) past perPrefix are all held, no IPv4 slot is evicted
// by a prefix, and the total is what bounds them.
func TestSourceLimitCountsIPv4PerAddressOnly(t *testing.T) {
	const perPrefix, total = 2, 6
	r := newLimitRig(t, 1, perPrefix, total)
	for i := range total {
		a := fmt.Sprint("192.0.2.", i+1)
		if i%2 == 1 {
			a = "::ffff:" + a
		}
		r.take(a, true, "", BoundNone)
	}
	if got := r.l.In(src("192.0.2.1").Prefix); got != 0 {
		t.Errorf("IPv4 counted under a prefix: %d", got)
	}
	if a, p := r.l.Tracked(); a != total || p != 0 {
		t.Errorf("tracked %d addresses and %d prefixes, want %d and 0", a, p, total)
	}
	r.take("192.0.2.100", true, "192.0.2.1#1", BoundTotal)
	r.take("192.0.2.101", true, "::ffff:192.0.2.2#1", BoundTotal)
}

// Over the total the oldest slot of all is evicted, whatever its source,
// unless the new slot's /64 is at its bound: then that /64's oldest, and
// only that one (the total has room after it).
func TestSourceLimitEvictsTheOldestOfAll(t *testing.T) {
	r := newLimitRig(t, 4, 2, 4)
	r.take("192.0.2.1", true, "", BoundNone)
	r.take("fd00:1::1", true, "", BoundNone)
	r.take("fd00:2::1", true, "", BoundNone)
	r.take("fd00:1::2", true, "", BoundNone)
	if n := r.l.Len(); n != 4 {
		t.Fatalf("%d held, want the total 4", n)
	}
	// fd00:1::/64 and the total both full: one eviction, the /64's.
	r.take("fd00:1::3", true, "fd00:1::1#1", BoundPrefix)
	// Another /64, not full: the oldest of all.
	r.take("fd00:3::1", true, "192.0.2.1#1", BoundTotal)
	r.take("198.51.100.1", true, "fd00:2::1#1", BoundTotal)
	if n := r.l.Len(); n != 4 {
		t.Errorf("%d held after the evictions, want the total 4", n)
	}
	if diff := cmp.Diff([]string{"fd00:1::2#1", "fd00:1::3#1", "fd00:3::1#1", "198.51.100.1#1"}, r.l.Values()); diff != "" {
		t.Errorf("held (-want +got):\n%s", diff)
	}
}

// Release gives a slot back once, however often it is called, and says
// whether the slot was evicted instead; once all are given back nothing
// is kept.
func TestSourceLimitReleaseOnce(t *testing.T) {
	r := newLimitRig(t, 2, 2, 3)
	a := r.take("fd00::1", true, "", BoundNone)
	b := r.take("fd00::1", true, "", BoundNone)
	c := r.take("fd00::2", true, "fd00::1#1", BoundPrefix)
	if r.l.Release(r.slots[b]) || r.l.Release(r.slots[b]) {
		t.Error("Release of a slot not evicted says it was")
	}
	if n, from := r.l.Len(), r.l.From(netip.MustParseAddr("fd00::1")); n != 1 || from != 0 {
		t.Fatalf("after one slot released twice: %d held, %d from fd00::1; want 1 and 0", n, from)
	}
	if !r.l.Release(r.slots[a]) || !r.l.Release(r.slots[a]) {
		t.Error("Release of an evicted slot does not say it was evicted")
	}
	if n := r.l.Len(); n != 1 {
		t.Fatalf("an evicted slot's Release gave back a place: %d held, want 1", n)
	}
	if r.l.EvictedBy(r.slots[b]) != BoundNone || r.l.EvictedBy(r.slots[c]) != BoundNone {
		t.Error("a slot not evicted reports a bound")
	}
	r.l.Release(r.slots[c])
	if n := r.l.Len(); n != 0 {
		t.Errorf("%d held after every release", n)
	}
	if a, p := r.l.Tracked(); a != 0 || p != 0 {
		t.Errorf("after every release %d addresses and %d prefixes kept", a, p)
	}
}

// Claim gives back a slot not evicted, which no newer slot can evict
// then, and refuses (giving back nothing) one evicted already.
func TestSourceLimitClaim(t *testing.T) {
	r := newLimitRig(t, 4, 4, 2)
	a := r.take("192.0.2.1", true, "", BoundNone)
	b := r.take("192.0.2.2", true, "", BoundNone)
	if !r.l.Claim(r.slots[a]) {
		t.Fatal("Claim of a held slot refused")
	}
	if r.l.Held(r.slots[a]) || r.l.Len() != 1 {
		t.Fatalf("after Claim: held %v, %d held in all; want released, 1", r.l.Held(r.slots[a]), r.l.Len())
	}
	// Claimed, a is not the oldest any more: b is.
	r.take("192.0.2.3", true, "", BoundNone)
	r.take("192.0.2.4", true, b, BoundTotal)
	if r.l.EvictedBy(r.slots[a]) != BoundNone {
		t.Error("a claimed slot was evicted")
	}
	if r.l.Claim(r.slots[b]) {
		t.Error("Claim of an evicted slot succeeded")
	}
	if n := r.l.Len(); n != 2 {
		t.Errorf("%d held after a refused Claim, want 2", n)
	}
	if !r.l.Claim(r.slots[a]) {
		t.Error("a second Claim of a claimed slot refused")
	}
	if n := r.l.Len(); n != 2 {
		t.Errorf("a second Claim gave back a place: %d held, want 2", n)
	}
}

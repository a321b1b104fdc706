package coap

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
)

// handshakeLimit counts per address, per IPv6 /64 and in all: a host
// that takes a new address of its /64 for every handshake (SLAAC, privacy
// addresses) is held by the /64's limit, which ends the /64's oldest
// handshake to make room for a new one instead of refusing it (refusing
// let one host holding the /64's places keep out every other device of
// its /64); over its address's limit a handshake is refused; IPv4
// (IPv4-mapped too) is counted per address only; past the total the
// oldest handshake of all is ended for a new one (refusing let a host
// claiming a few dozen IPv4 addresses keep every device out). A
// link-local /64 is counted per interface.
func TestHandshakeLimit(t *testing.T) {
	const limitNone, limitSource, limitPrefix, limitTotal = bridges.BoundNone, bridges.BoundSource, bridges.BoundPrefix, bridges.BoundTotal
	const perSource, perPrefix, total = 2, 5, 14
	h := bridges.NewSourceLimit[*handshakeConn](perSource, perPrefix, total)
	src := func(s string) bridges.Source {
		return bridges.SourceOf(net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(s), 5684)))
	}
	var held []*handshakeSlot
	// wantRefused is the limit that refuses the handshake (only its
	// address's can), limitNone if none; evicted, by which limit.
	take := func(from string, wantRefused bridges.Bound) (evicted *handshakeSlot, by bridges.Bound) {
		t.Helper()
		s := bridges.NewSlot[*handshakeConn](src(from), nil)
		ok, evicted, by := h.Take(s)
		refused := limitNone
		if !ok {
			refused = limitSource
		}
		if refused != wantRefused {
			t.Fatalf("take(%s): refused by limit %v, want %v (in flight %d)", from, refused, wantRefused, h.Len())
		}
		if counted := h.Held(s); counted != (refused == limitNone) {
			t.Fatalf("take(%s): counted %v, refused %v", from, counted, refused)
		}
		if h.Held(s) {
			held = append(held, s)
		}
		return evicted, by
	}
	noEviction := func(from string, wantRefused bridges.Bound) {
		t.Helper()
		if ev, _ := take(from, wantRefused); ev != nil {
			t.Fatalf("take(%s) ended the handshake from %v", from, ev.Source().Addr)
		}
	}
	evicts := func(from string, want *handshakeSlot, by bridges.Bound) {
		t.Helper()
		ev, endedBy := take(from, limitNone)
		if ev != want {
			var got, wantAddr any
			if ev != nil {
				got = ev.Source().Addr
			}
			if want != nil {
				wantAddr = want.Source().Addr
			}
			t.Fatalf("take(%s) ended the handshake from %v, want the oldest (of its /64, or of all), from %v", from, got, wantAddr)
		}
		if evicted, counted := h.EvictedBy(ev) != bridges.BoundNone, h.Held(ev); !evicted || counted || endedBy != by || h.EvictedBy(ev) != by {
			t.Fatalf("the ended handshake: evicted %v, counted %v, by limit %v (Take said %v); want by %v", evicted, counted, h.EvictedBy(ev), endedBy, by)
		}
	}
	// One address of fd00:1::/64: its own limit, refused past it.
	noEviction("fd00:1::1", limitNone)
	noEviction("fd00:1::1", limitNone)
	noEviction("fd00:1::1", limitSource)
	// More addresses of the same /64, up to its limit.
	noEviction("fd00:1::2", limitNone)
	noEviction("fd00:1::3", limitNone)
	noEviction("fd00:1::4%eth0", limitNone) // a zone does not make another /64 but link-local
	// Past it, whatever the address: the /64's oldest handshakes end, in
	// order, and the new ones are counted.
	oldest := held[:4]
	evicts("fd00:1::5", oldest[0], limitPrefix)
	evicts("fd00:1::ffff:1", oldest[1], limitPrefix)
	if got := h.From(netip.MustParseAddr("fd00:1::1")); got != 0 {
		t.Fatalf("fd00:1::1 has %d in flight after both of its were ended, want 0", got)
	}
	if got := h.In(src("fd00:1::9").Prefix); got != perPrefix {
		t.Fatalf("fd00:1::/64 holds %d, want its limit %d", got, perPrefix)
	}
	// Another /64 has its own room; link-local /64s of two interfaces
	// are two /64s.
	noEviction("fd00:2::1", limitNone)
	eth0 := len(held)
	for i := range perPrefix {
		noEviction(fmt.Sprintf("fe80::%x%%eth0", i+1), limitNone)
	}
	noEviction("fe80::1%eth1", limitNone) // eth0's fe80::/64 is full, eth1's is not
	// IPv4: per address, no prefix; a mapped address is the IPv4 one.
	noEviction("192.0.2.1", limitNone)
	noEviction("::ffff:192.0.2.1", limitNone)
	noEviction("192.0.2.1", limitSource)
	// All room taken: the oldest handshake of all ends for a new one,
	// but for a full /64's handshake, which takes the place of the /64's
	// oldest.
	if n := h.Len(); n != total {
		t.Fatalf("%d in flight, want the total %d", n, total)
	}
	evicts("198.51.100.1", oldest[2], limitTotal)
	evicts("fd00:3::1", oldest[3], limitTotal)
	evicts("fe80::99%eth0", held[eth0], limitPrefix)
	if n := h.Len(); n != total {
		t.Fatalf("%d in flight after the evictions, want the total %d", n, total)
	}
	// Released twice, counted back once; an ended one's release gives
	// back nothing more.
	last := held[len(held)-1]
	h.Release(last)
	h.Release(last)
	for _, s := range oldest[:4] {
		if !h.Release(s) {
			t.Error("release of an ended handshake does not say it was ended")
		}
	}
	if n := h.Len(); n != total-1 {
		t.Fatalf("in flight after one release (twice): %d, want %d", n, total-1)
	}
	noEviction("fd00:4::1", limitNone)
	for _, s := range held {
		h.Release(s)
	}
	if sources, prefixes := h.Tracked(); h.Len() != 0 || sources != 0 || prefixes != 0 {
		t.Fatalf("after every release: %d in flight, %d sources, %d prefixes kept", h.Len(), sources, prefixes)
	}
}

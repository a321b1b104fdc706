package coap

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
)

// handshakeLimit counts per address, per IPv6 /64 and in all: a host that
// takes a new address of its /64 for every handshake (SLAAC, privacy
// addresses) is held by the /64's limit; IPv4 (IPv4-mapped too) is counted
// per address only; every source together by the total.
func TestHandshakeLimit(t *testing.T) {
	const perSource, perPrefix, total = 2, 5, 12
	h := newHandshakeLimit(perSource, perPrefix, total)
	src := func(s string) handshakeSource {
		return sourceOf(net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(s), 5684)))
	}
	var held []handshakeSource
	var flags []*bool
	take := func(s handshakeSource, wantRefused int) {
		t.Helper()
		counted := new(bool)
		refused, _ := h.take(s, counted)
		if refused != wantRefused {
			t.Fatalf("take(%v): refused by limit %d, want %d (in flight %d)", s.addr, refused, wantRefused, h.inFlight())
		}
		if *counted != (refused == limitNone) {
			t.Fatalf("take(%v): counted %v, refused %d", s.addr, *counted, refused)
		}
		if *counted {
			held, flags = append(held, s), append(flags, counted)
		}
	}
	// One address of fd00:1::/64: its own limit.
	take(src("fd00:1::1"), limitNone)
	take(src("fd00:1::1"), limitNone)
	take(src("fd00:1::1"), limitSource)
	// More addresses of the same /64: the /64's limit, whatever the address.
	take(src("fd00:1::2"), limitNone)
	take(src("fd00:1::3"), limitNone)
	take(src("fd00:1::4%eth0"), limitNone) // a zone does not make another /64
	take(src("fd00:1::5"), limitPrefix)
	take(src("fd00:1::ffff:1"), limitPrefix)
	// Another /64 has its own room.
	take(src("fd00:2::1"), limitNone)
	// IPv4: per address, no prefix; a mapped address is the IPv4 one.
	take(src("192.0.2.1"), limitNone)
	take(src("::ffff:192.0.2.1"), limitNone)
	take(src("192.0.2.1"), limitSource)
	for i := 2; h.inFlight() < total; i++ {
		take(src(fmt.Sprint("192.0.2.", i)), limitNone)
	}
	// All room taken: any source is refused by the total.
	take(src("198.51.100.1"), limitTotal)
	take(src("fd00:3::1"), limitTotal)
	// Released twice, counted back once.
	h.release(held[0], flags[0])
	h.release(held[0], flags[0])
	if n := h.inFlight(); n != total-1 {
		t.Fatalf("in flight after one release (twice): %d, want %d", n, total-1)
	}
	take(src("fd00:1::1"), limitNone)
	for i := range held {
		h.release(held[i], flags[i])
	}
	if h.inFlight() != 0 || len(h.sources) != 0 || len(h.prefixes) != 0 {
		t.Fatalf("after every release: %d in flight, %d sources, %d prefixes kept", h.inFlight(), len(h.sources), len(h.prefixes))
	}
}

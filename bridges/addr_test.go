package bridges

import (
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// SourceOf is what the per-source limits of both bridges count: the
// address (IPv4-mapped as IPv4, the zone kept) and, for IPv6 only, its
// /64; a link-local /64 with the zone it was seen on, so that link-local
// hosts of two LAN interfaces do not share one fe80::/64 (before, the zone
// was dropped and they did), any other without it.
func TestSourceOf(t *testing.T) {
	tcp := func(s string) net.Addr {
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(s), 8883))
	}
	udp := func(s string) net.Addr {
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(s), 5684))
	}
	src := func(addr, prefix, zone string) Source {
		s := Source{Addr: netip.MustParseAddr(addr)}
		if prefix != "" {
			s.Prefix = Prefix{Net: netip.MustParsePrefix(prefix), Zone: zone}
		}
		return s
	}
	for _, tc := range []struct {
		name string
		a    net.Addr
		want Source
	}{
		{"IPv4", tcp("192.0.2.1"), src("192.0.2.1", "", "")},
		{"IPv4-mapped", tcp("::ffff:192.0.2.1"), src("192.0.2.1", "", "")},
		{"IPv6", tcp("2001:db8:1:2:aa:bb:cc:dd"), src("2001:db8:1:2:aa:bb:cc:dd", "2001:db8:1:2::/64", "")},
		{"IPv6 over UDP", udp("fd00::7"), src("fd00::7", "fd00::/64", "")},
		{"link-local with zone", tcp("fe80::1%eth0"), src("fe80::1%eth0", "fe80::/64", "eth0")},
		{"link-local on another interface", udp("fe80::1%eth1"), src("fe80::1%eth1", "fe80::/64", "eth1")},
		{"not link-local, with zone", tcp("fd00::7%eth0"), src("fd00::7%eth0", "fd00::/64", "")},
		{"loopback", tcp("::1"), src("::1", "::/64", "")},
		{"not TCP or UDP", &net.UnixAddr{Name: "/run/x", Net: "unix"}, Source{}},
	} {
		got := SourceOf(tc.a)
		if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
			cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
			t.Errorf("%s: SourceOf(%v) (-want +got):\n%s", tc.name, tc.a, diff)
		}
	}
	a, b := SourceOf(tcp("fe80::1%eth0")).Prefix, SourceOf(tcp("fe80::2%eth1")).Prefix
	if a == b {
		t.Errorf("link-local /64s of two interfaces are one key: %v", a)
	}
	if got, want := b.String(), "fe80::/64%eth1"; got != want {
		t.Errorf("Prefix.String() = %q, want %q", got, want)
	}
	if got := SourceOf(tcp("fd00::1")).Prefix.String(); got != "fd00::/64" {
		t.Errorf("Prefix.String() = %q, want fd00::/64", got)
	}
}

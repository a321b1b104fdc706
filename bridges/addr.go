package bridges

import (
	"net"
	"net/netip"
)

// Source is where a connection comes from, as the per-source limits of
// the bridges count it (coap's handshakes, mqtt's unauthenticated
// connections and secret logins): its address, and for IPv6 the /64 its
// host can take further addresses from (SourcePrefix). Prefix is not
// valid for IPv4: those limits count an IPv4 source per address only.
type Source struct {
	Addr   netip.Addr
	Prefix Prefix
}

// Prefix is the network of a Source that the limits count together: an
// IPv6 /64, and for a link-local one the zone (the interface) it was seen
// on. Every link has the same link-local prefix, fe80::/64, so without
// the zone the link-local hosts of every LAN interface would share one
// budget; netip.Prefix cannot hold a zone, hence the struct. Comparable:
// a map key. The zero Prefix is not valid (an IPv4 source).
type Prefix struct {
	Net  netip.Prefix
	Zone string // only for a link-local prefix
}

// IsValid reports whether p is a prefix (not an IPv4 source's zero one).
func (p Prefix) IsValid() bool { return p.Net.IsValid() }

// String is the prefix, with "%zone" after it if it has one
// ("fe80::/64%eth1").
func (p Prefix) String() string {
	if p.Zone == "" {
		return p.Net.String()
	}
	return p.Net.String() + "%" + p.Zone
}

// SourceOf is the Source of a connection from a (ports are not part of
// it: they change with every connection); the zero Source for an address
// that is not TCP or UDP.
func SourceOf(a net.Addr) Source {
	ip, ok := SourceAddr(a)
	if !ok {
		return Source{}
	}
	p, _ := SourcePrefix(ip)
	return Source{Addr: ip, Prefix: p}
}

// SourceAddr is the IP address a connection comes from, an IPv4-mapped
// IPv6 address (from a dual-stack socket) as the IPv4 address it is, the
// zone kept; false for an address that is not TCP or UDP.
func SourceAddr(a net.Addr) (netip.Addr, bool) {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.UDPAddr:
		ap = a.AddrPort()
	case *net.TCPAddr:
		ap = a.AddrPort()
	default:
		return netip.Addr{}, false
	}
	ip := ap.Addr()
	if ip.Is4In6() {
		ip = ip.Unmap()
	}
	return ip, ip.IsValid()
}

// SourcePrefix is the network from which the host at a can take further
// addresses at will, for limits it must not escape by changing address:
// for IPv6 the /64 (SLAAC and privacy extensions let every host on a link
// use any address of the link's /64); false for IPv4, where a host has the
// addresses it was given. A link-local /64 keeps a's zone: fe80::/64 on
// one interface is another link than fe80::/64 on the next, whose hosts
// cannot take addresses of the first. Any other prefix drops it (it names
// the same network from every interface).
func SourcePrefix(a netip.Addr) (Prefix, bool) {
	if !a.Is6() || a.Is4In6() {
		return Prefix{}, false
	}
	p, err := a.WithZone("").Prefix(64)
	if err != nil {
		return Prefix{}, false
	}
	if a.IsLinkLocalUnicast() {
		return Prefix{Net: p, Zone: a.Zone()}, true
	}
	return Prefix{Net: p}, true
}

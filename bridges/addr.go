package bridges

import (
	"net"
	"net/netip"
)

// SourceHost is the address a connection comes from without its port: the
// key of the per-source limits (ports change with every connection).
func SourceHost(a net.Addr) string {
	switch a := a.(type) {
	case *net.UDPAddr:
		return a.IP.String()
	case *net.TCPAddr:
		return a.IP.String()
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
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
// use any address of the link's /64), zone dropped; false for IPv4, where a
// host has the addresses it was given.
func SourcePrefix(a netip.Addr) (netip.Prefix, bool) {
	if !a.Is6() || a.Is4In6() {
		return netip.Prefix{}, false
	}
	p, err := a.WithZone("").Prefix(64)
	return p, err == nil
}

package bridges

import "net"

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

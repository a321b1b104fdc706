package coap

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

// limitListener bounds DTLS handshakes in flight, per source and in all
// (handshakeLimit, shared by the server's listeners), so that one host
// cannot take every handshake slot and all hosts together cannot hold more
// handshake state than the gateway can spare. The listener answers a
// ClientHello without a valid cookie itself, keeping no state (pion-dtls
// patch (51), Config.StatelessHelloVerify), so a connection exists only
// for a client that has echoed the HelloVerifyRequest cookie, i.e. has
// shown it receives at its address: spoofed ClientHellos cost the gateway
// an HMAC and a 48-byte answer each and hold nothing. A handshake counts
// from that echo (pion-dtls patch (50), Conn.SetOnCookieVerified) until it
// ends. pion's OnConnectionAttempt has no "done" callback, so the count is
// kept around HandshakeContext, which otacache.ServeDTLS calls with the
// server's handshake timeout.
//
// Until 2026-11-26 (session 14) pion made a connection for every first
// ClientHello; those waited up to 2 s for the echo and at most 512 of them
// over all sources (the oldest ended past that, counted hello_flood).
type limitListener struct {
	*coapnet.DTLSListener
	s     *Server
	guard *plaintextGuard
}

// errHandshakeLimit ends a handshake over a handshake limit.
var errHandshakeLimit = errors.New("too many handshakes in flight")

// Close closes the DTLS listener and its plaintext guard.
func (l *limitListener) Close() error {
	err := l.DTLSListener.Close()
	l.guard.close()
	return err
}

func (s *Server) limit(ln *coapnet.DTLSListener) *limitListener {
	return &limitListener{DTLSListener: ln, s: s}
}

// AcceptWithContext implements otacache.DTLSListener.
func (l *limitListener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	c, err := l.DTLSListener.AcceptWithContext(ctx)
	if err != nil {
		return nil, err
	}
	dc, ok := c.(*piondtls.Conn)
	if !ok {
		return c, nil
	}
	return &handshakeConn{Conn: dc, l: l, src: sourceOf(c.RemoteAddr())}, nil
}

// handshakeSource is where a handshake comes from, as handshakeLimit
// counts it: its address, and for IPv6 the /64 the address is in.
type handshakeSource struct {
	addr   netip.Addr
	prefix netip.Prefix
}

func sourceOf(a net.Addr) handshakeSource {
	s := bridges.SourceOf(a) // no prefix for IPv4: counted per address only
	return handshakeSource{addr: s.Addr, prefix: s.Prefix}
}

// handshakeLimit counts DTLS handshakes in flight: per source address
// (Config.MaxHandshakesPerSource), per IPv6 /64 (MaxHandshakesPerPrefix)
// and in all (MaxHandshakes). Why per /64: a host on an IPv6 link can use
// any address of the link's /64 (SLAAC, privacy addresses), so a limit per
// address alone is one it escapes by changing address; the /64's limit is
// higher because the link's other hosts share it. IPv4 is counted per
// address only: a host has the addresses it was given. The total bounds the
// handshake state all sources together hold (each handshake holds a pion
// connection and a goroutine for up to Config.HandshakeTimeout), whatever
// their addresses.
type handshakeLimit struct {
	perSource, perPrefix, total int

	mu       sync.Mutex
	sources  map[netip.Addr]int
	prefixes map[netip.Prefix]int
	n        int
}

func newHandshakeLimit(perSource, perPrefix, total int) *handshakeLimit {
	return &handshakeLimit{perSource: perSource, perPrefix: perPrefix, total: total,
		sources: map[netip.Addr]int{}, prefixes: map[netip.Prefix]int{}}
}

// Which limit refused a handshake (handshakeLimit.take).
const (
	limitNone   = iota
	limitSource // the source address's
	limitPrefix // its IPv6 /64's
	limitTotal  // all sources'
)

// take counts a handshake from src, and sets *counted, if every limit has
// room, and otherwise says which limit refused it and its value.
func (h *handshakeLimit) take(src handshakeSource, counted *bool) (refused, limit int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.sources[src.addr] >= h.perSource:
		return limitSource, h.perSource
	case src.prefix.IsValid() && h.prefixes[src.prefix] >= h.perPrefix:
		return limitPrefix, h.perPrefix
	case h.n >= h.total:
		return limitTotal, h.total
	}
	h.sources[src.addr]++
	if src.prefix.IsValid() {
		h.prefixes[src.prefix]++
	}
	h.n++
	*counted = true
	return limitNone, 0
}

// release gives back a handshake take counted, if *counted, and clears it
// (so at most once).
func (h *handshakeLimit) release(src handshakeSource, counted *bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !*counted {
		return
	}
	*counted = false
	if h.sources[src.addr] <= 1 {
		delete(h.sources, src.addr)
	} else {
		h.sources[src.addr]--
	}
	if src.prefix.IsValid() {
		if h.prefixes[src.prefix] <= 1 {
			delete(h.prefixes, src.prefix)
		} else {
			h.prefixes[src.prefix]--
		}
	}
	h.n--
}

// inFlight is how many handshakes are counted now.
func (h *handshakeLimit) inFlight() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// take counts c's handshake as in flight if the limits have room; it runs
// when c's client has echoed the cookie.
func (l *limitListener) take(c *handshakeConn) error {
	refused, limit := l.s.hs.take(c.src, &c.counted)
	if refused == limitNone {
		return nil
	}
	l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
	what, key, kind := "from this source", "coap.Config.MaxHandshakesPerSource", "limit:source"
	// The device is not known yet: its PSK identity or certificate
	// comes in the client's next flight.
	args := []any{"device", "", "remote", c.RemoteAddr().String(), "limit", limit}
	switch refused {
	case limitPrefix:
		what, key, kind = "from this source's IPv6 /64", "coap.Config.MaxHandshakesPerPrefix", "limit:prefix"
		args = append(args, "prefix", c.src.prefix.String())
	case limitTotal:
		what, key, kind = "in all", "coap.Config.MaxHandshakes", "limit:total"
	}
	// A flood of handshakes is a flood of refusals: one line per limit
	// per interval (the metric counts each).
	l.s.refusalLine(kind, "coap: handshake refused: too many handshakes in flight "+what, args...)
	return fmt.Errorf("%w %s (limit %d, %s)", errHandshakeLimit, what, limit, key)
}

// release gives c's slot back if it holds one (at most once).
func (l *limitListener) release(c *handshakeConn) {
	l.s.hs.release(c.src, &c.counted)
}

// handshakeConn counts its handshake as in flight from when its client
// echoed the cookie until the handshake ends.
type handshakeConn struct {
	*piondtls.Conn
	l       *limitListener
	src     handshakeSource
	counted bool // holds a slot of the server's handshakeLimit (under its mu)
}

func (c *handshakeConn) HandshakeContext(ctx context.Context) error {
	// The hook runs on this goroutine, inside HandshakeContext (pion's
	// server handshake runs on its caller's goroutine, patch (18)), before
	// any cryptographic work on the ClientHello.
	c.Conn.SetOnCookieVerified(func() error { return c.l.take(c) })
	err := c.Conn.HandshakeContext(ctx)
	c.l.release(c)
	if err != nil {
		if !errors.Is(err, errHandshakeLimit) { // counted as a refusal
			c.l.s.m.Handshakes.WithLabelValues(hub.CoAP, "failed").Inc()
		}
		c.l.s.log.Debug("coap: handshake failed", "device", "", "remote", c.RemoteAddr().String(), "err", err)
	}
	return err
}

func (c *handshakeConn) Close() error {
	c.l.release(c)
	return c.Conn.Close()
}

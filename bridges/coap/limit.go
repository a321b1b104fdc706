package coap

import (
	"container/list"
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
	return &handshakeConn{Conn: dc, l: l, slot: handshakeSlot{src: bridges.SourceOf(c.RemoteAddr())}}, nil
}

// handshakeLimit counts DTLS handshakes in flight: per source address
// (Config.MaxHandshakesPerSource), per IPv6 /64 (MaxHandshakesPerPrefix;
// a link-local one per interface, bridges.SourcePrefix) and in all
// (MaxHandshakes). Why per /64: a host on an IPv6 link can use any
// address of the link's /64 (SLAAC, privacy addresses), so a limit per
// address alone is one it escapes by changing address. Over its address's
// limit a handshake is refused (that address is the host itself); over
// its /64's, the oldest handshake in flight from the /64 is ended to make
// room for it instead: the /64 is shared by every IPv6 device of the
// link, and refusing there let one host of the link that echoes cookies
// and then stalls its handshakes (a few dozen, from as many addresses)
// keep out every other device of its /64 for as long as it liked. Ending
// the oldest, it pushes out only handshakes of its own /64 that are older
// than its newest, and a device's handshake is done in milliseconds: to
// end one, the host has to start more than the /64's limit of handshakes
// within that time, all of them answered cookies. IPv4 is counted per
// address only: a host has the addresses it was given (on a LAN it can
// still claim many unused ones, each a source of its own; the total is
// the bound then). The total bounds the handshake state all sources
// together hold (each handshake holds a pion connection and a goroutine
// for up to Config.HandshakeTimeout), whatever their addresses; over it
// the oldest handshake in flight of all is ended, for the same reason as
// per /64: refused, a host claiming a few dozen IPv4 addresses kept every
// device out with stalled handshakes; ending the oldest, it must start
// more than the total within a device's handshake to end that one.
type handshakeLimit struct {
	perSource, perPrefix, total int

	mu       sync.Mutex
	sources  map[netip.Addr]int
	prefixes map[bridges.Prefix]*list.List // of *handshakeSlot, oldest first
	all      list.List                     // of *handshakeSlot, oldest first
}

// handshakeSlot is one handshake's place in a handshakeLimit (fields
// under its mu but src and end, set before take).
type handshakeSlot struct {
	src     bridges.Source
	end     context.CancelFunc // ends the handshake (when evicted)
	elem    *list.Element      // in its /64's list (nil: IPv4)
	allElem *list.Element      // in the list of all
	counted bool               // holds a place
	evicted bool               // its place was taken for a newer handshake
	endedBy int                // when evicted, which limit: limitPrefix or limitTotal
}

func newHandshakeLimit(perSource, perPrefix, total int) *handshakeLimit {
	return &handshakeLimit{perSource: perSource, perPrefix: perPrefix, total: total,
		sources: map[netip.Addr]int{}, prefixes: map[bridges.Prefix]*list.List{}}
}

// Which limit refused or ended a handshake (handshakeLimit.take).
const (
	limitNone   = iota
	limitSource // the source address's
	limitPrefix // the source's IPv6 /64's
	limitTotal  // all sources'
)

// take counts s's handshake if its address has room, and otherwise says
// that limit refused it and its value. If s's /64 is at its limit, its
// oldest handshake in flight is released for s, or else, if all are, the
// oldest of all; that one is returned (evicted set, endedBy which limit):
// the caller ends it.
func (h *handshakeLimit) take(s *handshakeSlot) (refused, limit int, evicted *handshakeSlot) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sources[s.src.Addr] >= h.perSource {
		return limitSource, h.perSource, nil
	}
	q := h.prefixes[s.src.Prefix]
	switch {
	case s.src.Prefix.IsValid() && q != nil && q.Len() >= h.perPrefix:
		evicted = q.Front().Value.(*handshakeSlot)
		evicted.endedBy = limitPrefix
	case h.all.Len() >= h.total:
		evicted = h.all.Front().Value.(*handshakeSlot)
		evicted.endedBy = limitTotal
	}
	if evicted != nil {
		h.releaseLocked(evicted)
		evicted.evicted = true
	}
	h.sources[s.src.Addr]++
	if s.src.Prefix.IsValid() {
		if q = h.prefixes[s.src.Prefix]; q == nil {
			q = list.New()
			h.prefixes[s.src.Prefix] = q
		}
		s.elem = q.PushBack(s)
	}
	s.allElem = h.all.PushBack(s)
	s.counted = true
	return limitNone, 0, evicted
}

// release gives back s's place if it holds one (so at most once), and
// reports whether it was taken from it for a newer handshake instead.
func (h *handshakeLimit) release(s *handshakeSlot) (evicted bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.releaseLocked(s)
	return s.evicted
}

func (h *handshakeLimit) releaseLocked(s *handshakeSlot) {
	if !s.counted {
		return
	}
	s.counted = false
	if h.sources[s.src.Addr] <= 1 {
		delete(h.sources, s.src.Addr)
	} else {
		h.sources[s.src.Addr]--
	}
	if s.elem != nil {
		q := h.prefixes[s.src.Prefix]
		q.Remove(s.elem)
		s.elem = nil
		if q.Len() == 0 {
			delete(h.prefixes, s.src.Prefix)
		}
	}
	h.all.Remove(s.allElem)
	s.allElem = nil
}

// inFlight is how many handshakes are counted now.
func (h *handshakeLimit) inFlight() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.all.Len()
}

// inFlightFrom is how many handshakes from addr are counted now.
func (h *handshakeLimit) inFlightFrom(addr netip.Addr) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sources[addr]
}

// take counts c's handshake as in flight if the limits have room (ending
// the oldest of its /64's if that is full); it runs when c's client has
// echoed the cookie.
func (l *limitListener) take(c *handshakeConn) error {
	refused, limit, evicted := l.s.hs.take(&c.slot)
	if evicted != nil {
		// Counted, then ended: its HandshakeContext returns, and the
		// server closes it.
		l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
		evicted.end()
		if evicted.endedBy == limitPrefix {
			l.s.refusalLine("limit:prefix", "coap: oldest handshake in flight from this IPv6 /64 ended to make room for a newer one: too many handshakes in flight from this /64",
				"device", "", "remote", evicted.src.Addr.String(), "prefix", evicted.src.Prefix.String(), "limit", l.s.hs.perPrefix,
				"key", "coap.Config.MaxHandshakesPerPrefix")
		} else {
			l.s.refusalLine("limit:total", "coap: oldest handshake in flight ended to make room for a newer one: too many handshakes in flight in all",
				"device", "", "remote", evicted.src.Addr.String(), "limit", l.s.hs.total, "key", "coap.Config.MaxHandshakes")
		}
	}
	if refused == limitNone {
		return nil
	}
	l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
	// The device is not known yet: its PSK identity or certificate
	// comes in the client's next flight. A flood of handshakes is a flood
	// of refusals: one line per limit per interval (the metric counts
	// each).
	l.s.refusalLine("limit:source", "coap: handshake refused: too many handshakes in flight from this source",
		"device", "", "remote", c.RemoteAddr().String(), "limit", limit)
	return fmt.Errorf("%w from this source (limit %d, coap.Config.MaxHandshakesPerSource)", errHandshakeLimit, limit)
}

// handshakeConn counts its handshake as in flight from when its client
// echoed the cookie until the handshake ends.
type handshakeConn struct {
	*piondtls.Conn
	l    *limitListener
	slot handshakeSlot
}

func (c *handshakeConn) HandshakeContext(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.slot.end = cancel
	// The hook runs on this goroutine, inside HandshakeContext (pion's
	// server handshake runs on its caller's goroutine, patch (18)), before
	// any cryptographic work on the ClientHello.
	c.Conn.SetOnCookieVerified(func() error { return c.l.take(c) })
	err := c.Conn.HandshakeContext(ctx)
	evicted := c.l.s.hs.release(&c.slot)
	if err != nil {
		switch {
		case evicted: // counted as a refusal by the handshake that took its place
			err = fmt.Errorf("%w: ended for a newer handshake: %w", errHandshakeLimit, err)
		case !errors.Is(err, errHandshakeLimit): // else counted as a refusal
			c.l.s.m.Handshakes.WithLabelValues(hub.CoAP, "failed").Inc()
		}
		c.l.s.log.Debug("coap: handshake failed", "device", "", "remote", c.RemoteAddr().String(), "err", err)
	}
	return err
}

func (c *handshakeConn) Close() error {
	c.l.s.hs.release(&c.slot)
	return c.Conn.Close()
}

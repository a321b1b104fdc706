package coap

import (
	"context"
	"errors"
	"fmt"
	"net"

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
	hc := &handshakeConn{Conn: dc, l: l}
	hc.slot = bridges.NewSlot(bridges.SourceOf(c.RemoteAddr()), hc)
	return hc, nil
}

// handshakeLimit counts DTLS handshakes in flight, over both listeners:
// a bridges.SourceLimit (why it counts per address, per IPv6 /64 and in
// all, refusing past the first and evicting the oldest past the others,
// is said there), bounded by Config.MaxHandshakesPerSource,
// MaxHandshakesPerPrefix and MaxHandshakes. Each handshake holds a pion
// connection and a goroutine for up to Config.HandshakeTimeout. Over its
// address's limit a handshake is refused before any cryptographic work;
// an evicted one is ended (handshakeConn.end). A device's handshake is
// done in milliseconds: to end one, a host has to start more than the
// /64's limit (or the total) of handshakes within that time, all of them
// with an answered cookie.
type handshakeLimit = bridges.SourceLimit[*handshakeConn]

// handshakeSlot is one handshake's place in the handshakeLimit.
type handshakeSlot = bridges.Slot[*handshakeConn]

// take counts c's handshake as in flight if its address has room (ending
// the oldest of its /64's, or of all, if those are full); it runs when
// c's client has echoed the cookie.
func (l *limitListener) take(c *handshakeConn) error {
	ok, evicted, by := l.s.hs.Take(c.slot)
	if evicted != nil {
		// Counted, then ended: its HandshakeContext returns, and the
		// server closes it.
		l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
		evicted.Value().end()
		src := evicted.Source()
		if by == bridges.BoundPrefix {
			l.s.refusalLine("limit:prefix", "coap: oldest handshake in flight from this IPv6 /64 ended to make room for a newer one: too many handshakes in flight from this /64",
				"device", "", "remote", src.Addr.String(), "prefix", src.Prefix.String(), "limit", l.s.cfg.MaxHandshakesPerPrefix,
				"key", "coap.Config.MaxHandshakesPerPrefix")
		} else {
			l.s.refusalLine("limit:total", "coap: oldest handshake in flight ended to make room for a newer one: too many handshakes in flight in all",
				"device", "", "remote", src.Addr.String(), "limit", l.s.cfg.MaxHandshakes, "key", "coap.Config.MaxHandshakes")
		}
	}
	if ok {
		return nil
	}
	limit := l.s.cfg.MaxHandshakesPerSource
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
	slot *handshakeSlot
	// end ends the handshake when its slot is evicted; set before the
	// slot is taken.
	end context.CancelFunc
}

func (c *handshakeConn) HandshakeContext(ctx context.Context) error {
	serve := ctx // the server's, with its handshake timeout
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.end = cancel
	// The hook runs on this goroutine, inside HandshakeContext (pion's
	// server handshake runs on its caller's goroutine, patch (18)), before
	// any cryptographic work on the ClientHello.
	c.Conn.SetOnCookieVerified(func() error { return c.l.take(c) })
	err := c.Conn.HandshakeContext(ctx)
	if err == nil {
		if f := c.l.s.handshakeHook.Load(); f != nil {
			(*f)()
		}
		// Claimed, its slot can no longer be evicted. Evicted between
		// the handshake's end and here, too late for its context to end
		// it, it was counted as a refusal: it is ended too (the server
		// closes it), not kept as a session counted refused.
		if !c.l.s.hs.Claim(c.slot) {
			err = errors.New("its slot was taken as it completed")
		}
	}
	evicted := c.l.s.hs.Release(c.slot)
	if err != nil {
		switch {
		case evicted: // counted as a refusal by the handshake that took its place
			err = fmt.Errorf("%w: ended for a newer handshake: %w", errHandshakeLimit, err)
		case errors.Is(err, errHandshakeLimit): // counted as a refusal
		case errors.Is(serve.Err(), context.Canceled):
			// The server is stopping (its timeout would be
			// DeadlineExceeded): not the handshake's failure.
			c.l.s.log.Debug("coap: handshake ended: the server is stopping", "device", "", "remote", c.RemoteAddr().String())
			return err
		default:
			c.l.s.m.Handshakes.WithLabelValues(hub.CoAP, "failed").Inc()
		}
		c.l.s.log.Debug("coap: handshake failed", "device", "", "remote", c.RemoteAddr().String(), "err", err)
	}
	return err
}

func (c *handshakeConn) Close() error {
	c.l.s.hs.Release(c.slot)
	return c.Conn.Close()
}

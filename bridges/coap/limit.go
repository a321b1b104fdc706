package coap

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

// limitListener bounds DTLS handshakes in flight per source address, so
// that one host cannot take every handshake slot. The listener answers a
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
	mu    sync.Mutex
	inFly map[string]int
	guard *plaintextGuard
}

// errHandshakeLimit ends a handshake over the per-source limit.
var errHandshakeLimit = errors.New("too many handshakes in flight from this source address")

// Close closes the DTLS listener and its plaintext guard.
func (l *limitListener) Close() error {
	err := l.DTLSListener.Close()
	l.guard.close()
	return err
}

func (s *Server) limit(ln *coapnet.DTLSListener) *limitListener {
	return &limitListener{DTLSListener: ln, s: s, inFly: map[string]int{}}
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
	return &handshakeConn{Conn: dc, l: l, host: bridges.SourceHost(c.RemoteAddr())}, nil
}

// take counts c's handshake as in flight if its source has room; it runs
// when c's client has echoed the cookie.
func (l *limitListener) take(c *handshakeConn) error {
	l.mu.Lock()
	n := l.inFly[c.host]
	if n >= l.s.cfg.MaxHandshakesPerSource {
		l.mu.Unlock()
		l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
		// The device is not known yet: its PSK identity or certificate
		// comes in the client's next flight.
		l.s.log.Warn("coap: handshake refused: too many handshakes in flight from this source", "device", "", "remote", c.RemoteAddr().String(), "limit", l.s.cfg.MaxHandshakesPerSource)
		return fmt.Errorf("%w (limit %d, coap.Config.MaxHandshakesPerSource)", errHandshakeLimit, l.s.cfg.MaxHandshakesPerSource)
	}
	l.inFly[c.host] = n + 1
	c.counted = true
	l.mu.Unlock()
	return nil
}

// release gives c's slot back if it holds one (at most once).
func (l *limitListener) release(c *handshakeConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !c.counted {
		return
	}
	c.counted = false
	if l.inFly[c.host] <= 1 {
		delete(l.inFly, c.host)
	} else {
		l.inFly[c.host]--
	}
}

// handshakeConn counts its handshake as in flight from when its client
// echoed the cookie until the handshake ends.
type handshakeConn struct {
	*piondtls.Conn
	l       *limitListener
	host    string
	counted bool // holds a slot of l (under l.mu)
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

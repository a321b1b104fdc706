package coap

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// limitListener bounds DTLS handshakes in flight per source address, so
// that one host cannot take every handshake slot. A handshake counts only
// once its client has echoed the HelloVerifyRequest cookie (pion-dtls
// patch (50), Conn.SetOnCookieVerified), i.e. has shown it receives at its
// address, and until it ends. pion's listener hands out a connection on
// the first ClientHello, which anyone can send from a spoofed address:
// counted from Accept (until 2026-11-26), 8 spoofed ClientHellos every
// 10 s from a LAN host locked the device whose address they carried out
// of the gateway. A connection whose client has not echoed the cookie
// within cookieWait is ended, so spoofed ClientHellos cannot pile up for
// the whole handshake timeout either. pion's OnConnectionAttempt has no
// "done" callback, so the count is kept around HandshakeContext, which
// otacache.ServeDTLS calls with the server's handshake timeout.
type limitListener struct {
	*coapnet.DTLSListener
	s     *Server
	mu    sync.Mutex
	inFly map[string]int
	guard *plaintextGuard
}

// cookieWait bounds the wait for a client to echo the cookie: a LAN round
// trip takes milliseconds, and a client whose first ClientHello or the
// HelloVerifyRequest was lost retransmits after 1 s (pion, libcoap,
// tinydtls), inside this bound. A client that misses it starts again with
// a new connection and cookie.
const cookieWait = 2 * time.Second

// errNoCookie ends a handshake whose client did not echo the cookie in
// time.
var errNoCookie = errors.New("client did not echo the HelloVerifyRequest cookie within " + cookieWait.String())

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
	return &handshakeConn{Conn: dc, l: l, host: hostOf(c.RemoteAddr())}, nil
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

func hostOf(a net.Addr) string {
	if u, ok := a.(*net.UDPAddr); ok {
		return u.IP.String()
	}
	h, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return h
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
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	noCookie := time.AfterFunc(cookieWait, func() { cancel(errNoCookie) })
	// The hook runs on this goroutine, inside HandshakeContext (pion's
	// server handshake runs on its caller's goroutine, patch (18)).
	c.Conn.SetOnCookieVerified(func() error {
		if !noCookie.Stop() {
			return errNoCookie
		}
		return c.l.take(c)
	})
	err := c.Conn.HandshakeContext(ctx)
	noCookie.Stop()
	c.l.release(c)
	if err != nil {
		if errors.Is(context.Cause(ctx), errNoCookie) {
			err = fmt.Errorf("%w: %w", errNoCookie, err)
		}
		if !errors.Is(err, errHandshakeLimit) {
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

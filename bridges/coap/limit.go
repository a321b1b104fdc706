package coap

import (
	"context"
	"net"
	"sync"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// limitListener bounds DTLS handshakes in flight per source address: a
// flood of ClientHellos from one host (cookies already stop spoofed ones)
// cannot take every handshake slot. pion's OnConnectionAttempt has no "done"
// callback, so the count is kept around HandshakeContext, which
// otacache.ServeDTLS calls with the server's handshake timeout.
type limitListener struct {
	*coapnet.DTLSListener
	s     *Server
	mu    sync.Mutex
	inFly map[string]int
	guard *plaintextGuard
}

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
	for {
		c, err := l.DTLSListener.AcceptWithContext(ctx)
		if err != nil {
			return nil, err
		}
		dc, ok := c.(*piondtls.Conn)
		if !ok {
			return c, nil
		}
		host := hostOf(c.RemoteAddr())
		l.mu.Lock()
		n := l.inFly[host]
		if n >= l.s.cfg.MaxHandshakesPerSource {
			l.mu.Unlock()
			l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit).Inc()
			l.s.log.Warn("coap: handshake refused: too many handshakes in flight from this source", "device", "", "remote", c.RemoteAddr().String(), "limit", l.s.cfg.MaxHandshakesPerSource)
			c.Close()
			continue
		}
		l.inFly[host] = n + 1
		l.mu.Unlock()
		return &handshakeConn{Conn: dc, release: func(err error) {
			l.release(host)
			if err != nil {
				l.s.m.Handshakes.WithLabelValues(hub.CoAP, "failed").Inc()
				l.s.log.Debug("coap: handshake failed", "remote", c.RemoteAddr().String(), "err", err)
			}
		}}, nil
	}
}

func (l *limitListener) release(host string) {
	l.mu.Lock()
	if l.inFly[host] <= 1 {
		delete(l.inFly, host)
	} else {
		l.inFly[host]--
	}
	l.mu.Unlock()
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

// handshakeConn counts its handshake as in flight until it ends.
type handshakeConn struct {
	*piondtls.Conn
	once    sync.Once
	release func(error)
}

func (c *handshakeConn) HandshakeContext(ctx context.Context) error {
	err := c.Conn.HandshakeContext(ctx)
	c.once.Do(func() { c.release(err) })
	return err
}

func (c *handshakeConn) Close() error {
	c.once.Do(func() { c.release(nil) })
	return c.Conn.Close()
}

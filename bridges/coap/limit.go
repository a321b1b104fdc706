package coap

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"github.com/bastion-iot/bastion/bridges"
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
//
// It also bounds the connections waiting for a cookie echo, over all
// sources (MaxCookieWaiting): each holds a connection and a goroutine
// (4.2 KiB of heap measured, plus the goroutine's stack) for up to cookieWait, and ClientHellos from spoofed
// addresses cost the sender one datagram each, so a LAN host could
// otherwise fill a 256 MiB router's memory in seconds (5,000 ClientHellos
// in 0.7 s took 2,274 goroutines and 20 MiB of heap). Past the bound the
// oldest waiting connection is ended: a real client echoes its cookie
// within a round trip, long before a flood pushes it out.
type limitListener struct {
	*coapnet.DTLSListener
	s     *Server
	mu    sync.Mutex
	inFly map[string]int
	guard *plaintextGuard
	// waiting are the connections accepted whose client has not echoed
	// the cookie yet, oldest first (under mu). evicted counts those ended
	// to make room since the last log line, at floodLogged.
	waiting     list.List
	evicted     int
	floodLogged time.Time
}

// floodLogEvery spaces the log lines about evicted connections.
const floodLogEvery = time.Minute

// cookieWait bounds the wait for a client to echo the cookie: a LAN round
// trip takes milliseconds, and a client whose first ClientHello or the
// HelloVerifyRequest was lost retransmits after 1 s (pion, libcoap,
// tinydtls), inside this bound. A client that misses it starts again with
// a new connection and cookie.
const cookieWait = 2 * time.Second

// errNoCookie ends a handshake whose client did not echo the cookie in
// time.
var errNoCookie = errors.New("client did not echo the HelloVerifyRequest cookie within " + cookieWait.String())

// errEvicted ends a handshake whose client had not echoed the cookie when
// MaxCookieWaiting newer connections had come.
var errEvicted = errors.New("ended to make room: too many connections waiting for a cookie echo (a flood of ClientHellos)")

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
	hc := &handshakeConn{Conn: dc, l: l, host: bridges.SourceHost(c.RemoteAddr())}
	l.admit(hc)
	return hc, nil
}

// admit adds c to the connections waiting for a cookie echo and, past
// MaxCookieWaiting, ends the oldest of them.
func (l *limitListener) admit(c *handshakeConn) {
	l.mu.Lock()
	c.elem = l.waiting.PushBack(c)
	var old *handshakeConn
	if l.waiting.Len() > l.s.cfg.MaxCookieWaiting {
		old = l.waiting.Remove(l.waiting.Front()).(*handshakeConn)
		old.elem = nil
		old.evicted = true
		if old.cancel != nil {
			old.cancel(errEvicted)
		}
		l.evicted++
	}
	logNow := old != nil && time.Since(l.floodLogged) >= floodLogEvery
	n := l.evicted
	if logNow {
		l.floodLogged, l.evicted = time.Now(), 0
	}
	l.mu.Unlock()
	if old == nil {
		return
	}
	l.s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonHelloFlood).Inc()
	if logNow {
		// The device is not known: its identity comes after the cookie.
		l.s.log.Warn("coap: ClientHellos flooding in: handshakes that did not echo their cookie were ended to make room (spoofed addresses, or a misbehaving host)",
			"device", "", "ended", n, "since", floodLogEvery, "waiting_limit", l.s.cfg.MaxCookieWaiting, "last_remote", old.RemoteAddr().String())
	}
}

// unwait takes c off the waiting list; false if it was evicted.
func (l *limitListener) unwait(c *handshakeConn) bool {
	if c.elem != nil {
		l.waiting.Remove(c.elem)
		c.elem = nil
	}
	return !c.evicted
}

// take counts c's handshake as in flight if its source has room; it runs
// when c's client has echoed the cookie.
func (l *limitListener) take(c *handshakeConn) error {
	l.mu.Lock()
	if !l.unwait(c) {
		l.mu.Unlock()
		return errEvicted
	}
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
	l.unwait(c)
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
	// Under l.mu: elem is c in l.waiting (nil when not there); evicted:
	// ended to make room; cancel ends the running handshake.
	elem    *list.Element
	evicted bool
	cancel  context.CancelCauseFunc
}

func (c *handshakeConn) HandshakeContext(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	c.l.mu.Lock()
	evicted := c.evicted
	c.cancel = cancel
	c.l.mu.Unlock()
	if evicted {
		cancel(errEvicted)
	}
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
		if cause := context.Cause(ctx); errors.Is(cause, errNoCookie) || errors.Is(cause, errEvicted) {
			err = fmt.Errorf("%w: %w", cause, err)
		}
		if !errors.Is(err, errHandshakeLimit) && !errors.Is(err, errEvicted) { // counted as refusals
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

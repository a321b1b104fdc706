package otacache

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	dtlsserver "github.com/plgd-dev/go-coap/v3/dtls/server"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/net/monitor/inactivity"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
)

// DTLSListener is what ServeDTLS accepts connections from: go-coap's
// coapnet.DTLSListener or a wrapper around it (bridges/coap limits
// handshakes per source).
type DTLSListener interface {
	AcceptWithContext(ctx context.Context) (net.Conn, error)
	Close() error
}

// DTLSServeConfig configures ServeDTLS. Only Handler is required.
type DTLSServeConfig struct {
	Handler udpclient.HandlerFunc
	// MaxMessageSize bounds one CoAP message (default go-coap's 64 KiB).
	MaxMessageSize uint32
	// HandshakeTimeout bounds one DTLS handshake (default 10 s); it derives
	// from ctx, so shutdown ends handshakes too.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a connection that sent nothing for this long
	// (default 1 min). OnIdle, if set, does the closing instead (so the
	// caller can log it); it must close the connection.
	IdleTimeout time.Duration
	OnIdle      func(*udpclient.Conn)
	// OnNewConn runs after the handshake, before the first request is
	// read: the place to bind the connection to its device.
	OnNewConn func(*udpclient.Conn)
	// Errors receives connection errors (default: dropped).
	Errors func(error)
	// ResponseCacheEntries bounds each connection's cache of responses for
	// retransmitted requests (default 32; see ResponseCache).
	ResponseCacheEntries int
	// BlockwiseSZX is the largest Block2 size offered (default 1024).
	BlockwiseSZX blockwise.SZX
}

// ServeDTLS is go-coap's dtls.Server accept loop with the one change that
// keeps a firmware-serving gateway's memory bounded: every connection gets
// a ResponseCache of ResponseCacheEntries instead of go-coap's default,
// which keeps every response (one per firmware block) for 247 s.
// Block-wise transfer (RFC 7959) is on. It serves until ctx ends or l
// fails, then closes l and every connection and waits for their
// goroutines (go-coap's Accept does not return on ctx alone, so ServeDTLS
// closes l when ctx ends). A nil error means ctx ended or l was closed.
func ServeDTLS(ctx context.Context, l DTLSListener, cfg DTLSServeConfig) error {
	if cfg.Handler == nil {
		return errors.New("serve dtls: no handler")
	}
	if cfg.MaxMessageSize == 0 {
		cfg.MaxMessageSize = 64 * 1024
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = time.Minute
	}
	if cfg.OnIdle == nil {
		cfg.OnIdle = func(cc *udpclient.Conn) { _ = cc.Close() }
	}
	if cfg.Errors == nil {
		cfg.Errors = func(error) {}
	}
	if cfg.ResponseCacheEntries <= 0 {
		cfg.ResponseCacheEntries = 32
	}
	if cfg.BlockwiseSZX == 0 || cfg.BlockwiseSZX > blockwise.SZX1024 {
		cfg.BlockwiseSZX = blockwise.SZX1024
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conns := &dtlsConns{m: map[*udpclient.Conn]struct{}{}}
	var wg sync.WaitGroup
	// One ticker for all connections expires their caches and runs their
	// inactivity monitors, as go-coap's periodic runner would.
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tk.C:
				for _, cc := range conns.list() {
					cc.CheckExpirations(now)
				}
			}
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		_ = l.Close()
	}()
	var err error
	for {
		rw, aerr := l.AcceptWithContext(ctx)
		if aerr != nil {
			if ctx.Err() != nil || listenerClosed(aerr) {
				break
			}
			var ne net.Error
			if errors.As(aerr, &ne) && ne.Timeout() {
				continue
			}
			err = fmt.Errorf("serve dtls: accept: %w", aerr)
			break
		}
		if rw == nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); serveDTLSConn(ctx, rw, &cfg, conns) }()
	}
	cancel()
	for _, cc := range conns.list() {
		_ = cc.Close()
	}
	wg.Wait()
	return err
}

// listenerClosed reports whether err says the listener was closed: by
// net (ErrClosed), by go-coap (ErrListenerIsClosed) or by pion/dtls's
// internal UDP listener, whose error value is not exported.
func listenerClosed(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, coapnet.ErrListenerIsClosed) ||
		strings.HasSuffix(err.Error(), "udp: listener closed")
}

type dtlsConns struct {
	mu sync.Mutex
	m  map[*udpclient.Conn]struct{}
}

func (c *dtlsConns) list() []*udpclient.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*udpclient.Conn, 0, len(c.m))
	for cc := range c.m {
		out = append(out, cc)
	}
	return out
}

func serveDTLSConn(ctx context.Context, rw net.Conn, cfg *DTLSServeConfig, conns *dtlsConns) {
	if hs, ok := rw.(interface{ HandshakeContext(context.Context) error }); ok {
		hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
		err := hs.HandshakeContext(hctx)
		cancel()
		if err != nil {
			cfg.Errors(fmt.Errorf("%v: handshake failed: %w", rw.RemoteAddr(), err))
			_ = rw.Close()
			return
		}
	}
	ccfg := udpclient.DefaultConfig
	ccfg.Handler = cfg.Handler
	ccfg.Errors = cfg.Errors
	ccfg.MaxMessageSize = cfg.MaxMessageSize
	ccfg.BlockwiseSZX = cfg.BlockwiseSZX
	ccfg.QBlockwiseSecure = true
	session := dtlsserver.NewSession(ctx, coapnet.NewConn(rw), cfg.MaxMessageSize, ccfg.MTU, true)
	cc := udpclient.NewConnWithOpts(session, &ccfg,
		udpclient.WithBlockWise(func(cc *udpclient.Conn) *blockwise.BlockWise[*udpclient.Conn] {
			return blockwise.New(cc, time.Minute, cfg.Errors, func(token message.Token) (*pool.Message, bool) {
				return cc.GetObservationRequest(token)
			})
		}),
		udpclient.WithInactivityMonitor(udpclient.DeferInactivityWhileConfirmableMessagesPending(
			inactivity.New(cfg.IdleTimeout, cfg.OnIdle))),
		udpclient.WithResponseMessageCache(NewResponseCache(cfg.ResponseCacheEntries)),
	)
	if cfg.OnNewConn != nil {
		cfg.OnNewConn(cc)
	}
	conns.mu.Lock()
	conns.m[cc] = struct{}{}
	conns.mu.Unlock()
	defer func() {
		conns.mu.Lock()
		delete(conns.m, cc)
		conns.mu.Unlock()
	}()
	// A connection accepted while shutting down would be missed by the
	// closing loop in ServeDTLS.
	if ctx.Err() != nil {
		_ = cc.Close()
	}
	if err := cc.Run(); err != nil {
		cfg.Errors(fmt.Errorf("%v: %w", cc.RemoteAddr(), err))
	}
}

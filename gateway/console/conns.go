package console

import (
	"context"
	"log/slog"
	"net"
	"net/http"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/connlimit"
)

// The console listener's bounds (a connlimit.Listener). Each connection
// holds a goroutine, an fd, TLS state and HTTP buffers for as long as its
// client keeps it (IdleTimeout, again after every request), and anyone on
// the LAN can open one and ask for the login page: without them one host
// could hold connections until the gateway runs out of memory or file
// descriptors. A connection is signed in once a request on it carried a
// valid session cookie or API token (claimSignedIn): an administrator's,
// it is never closed for room. Those not signed in yet are bounded per
// source address (past it a new one is closed at once), per IPv6 /64 and
// in all (past those the /64's, or all's, oldest is closed); the last is
// half of the places, so that a flood never holds more than half of them.
// With every place taken, a new connection closes the oldest not signed
// in; only when all are signed in is the new one closed. So a flood pushes
// out its own connections: an administrator's new connection is the
// newest, the last to go, and once a request on it has shown a session it
// stays.
const (
	maxConns                = 64
	maxNotSignedInPerAddr   = 8  // a browser opens at most 6 to one host
	maxNotSignedInPerPrefix = 16 // the LAN's hosts may share one /64
	maxNotSignedIn          = 32
)

// Refused counts and logs a connection the console's listener closes to
// stay within its bounds: reason is bastion_https_handshake_refusals_total's,
// kind what its lines are spaced by (the gateway's httpsRefusals.refused).
type Refused func(level slog.Level, kind, reason, msg string, args ...any)

// notSignedInMsg is the line for a connection closed by a bound of those
// not signed in, by bound.
var notSignedInMsg = map[bridges.Bound]string{
	bridges.BoundSource: "connection refused: too many not signed in from this address",
	bridges.BoundPrefix: "oldest connection not signed in of this IPv6 /64 closed: too many not signed in from the /64",
	bridges.BoundTotal:  "oldest connection not signed in closed: too many not signed in in all",
}

// limitConns bounds ln's connections, telling refused of each it closes.
func limitConns(ln net.Listener, refused Refused) net.Listener {
	out := bridges.NewSourceLimit[net.Conn](maxNotSignedInPerAddr, maxNotSignedInPerPrefix, maxNotSignedIn)
	return connlimit.New(ln, maxConns, out, connlimit.Events{
		Limited: func(c net.Conn, src bridges.Source, by bridges.Bound) {
			args := []any{"remote", c.RemoteAddr().String(),
				"from_this_address", out.From(src.Addr), "per_address_limit", maxNotSignedInPerAddr}
			if src.Prefix.IsValid() {
				args = append(args, "prefix", src.Prefix.String(), "from_this_prefix", out.In(src.Prefix), "per_prefix_limit", maxNotSignedInPerPrefix)
			}
			args = append(args, "in_all", out.Len(), "limit", maxNotSignedIn)
			refused(slog.LevelWarn, hub.ReasonHandshakeLimit+":"+by.String(), hub.ReasonHandshakeLimit, notSignedInMsg[by], args...)
		},
		PushedOut: func(c net.Conn) {
			refused(slog.LevelWarn, hub.ReasonHandshakeLimit+":conns", hub.ReasonHandshakeLimit,
				"oldest connection not signed in closed: the listener's connections are all in use",
				"remote", c.RemoteAddr().String(), "not_signed_in", out.Len(), "limit", maxConns)
		},
		Refused: func(c net.Conn) {
			refused(slog.LevelWarn, "conn_limit", "conn_limit",
				"connection refused: the listener's connections are all in use, every one signed in",
				"remote", c.RemoteAddr().String(), "limit", maxConns)
		},
	})
}

// connKey is the request context key of the connection (a *tls.Conn on
// one of limitConns') a request came on: the http.Server's ConnContext.
type connKey struct{}

func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// claimSignedIn claims, before h serves it, the connection of a request
// that carries a valid session cookie or API token: it is an
// administrator's, so no newer connection closes it for room (limitConns),
// not even in the middle of this request. Only the console's own Handler
// can tell; any other h (the placeholder) signs no one in.
func claimSignedIn(h http.Handler) http.Handler {
	ch, ok := h.(*Handler)
	if !ok {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(connKey{}).(net.Conn); ok && !connlimit.Claimed(c) && ch.signedIn(r) {
			connlimit.Claim(c)
		}
		h.ServeHTTP(w, r)
	})
}

// signedIn reports whether r is one the console would serve as someone:
// from the LAN, with a session or API token that authenticate accepts.
// It is asked of every request until its connection is claimed; one
// with neither cookie nor token costs no store read.
func (h *Handler) signedIn(r *http.Request) bool {
	if !h.fromLAN(r.RemoteAddr) {
		return false
	}
	p, err := h.authenticate(r)
	return err == nil && p != nil
}

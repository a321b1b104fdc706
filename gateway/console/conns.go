package console

import (
	"context"
	"errors"
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
// it is never closed for room. At most maxSignedInPerAddr of one address
// are signed in, past it they count as not signed in: any account (a
// viewer, any API token) signs in, and one that claimed every place would
// keep every newcomer out, the administrator too. A request on a
// signed-in connection that no longer authenticates (logged out, session
// or token or account deleted) makes it not signed in again. Those not
// signed in yet are bounded per
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
	maxSignedInPerAddr      = 16 // a few browsers' 6 each, scripts with tokens
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
	return connlimit.New(ln, maxConns, maxSignedInPerAddr, out, connlimit.Events{
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
// not even in the middle of this request; past maxSignedInPerAddr it
// stays unclaimed. A request that authenticates no one unclaims its
// connection, so that a session ended, or an account or token deleted,
// holds no place; one whose address holds its bound of unclaimed
// connections is closed after this answer instead. One whose check could
// not be made (the store unreadable) leaves its connection as it is. Only
// the console's own Handler can tell; any other h (the placeholder) signs
// no one in.
func claimSignedIn(h http.Handler) http.Handler {
	ch, ok := h.(*Handler)
	if !ok {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
			switch ch.signedIn(r) {
			case signInYes:
				connlimit.Claim(c)
			case signInNo:
				if !connlimit.Unclaim(c) {
					w.Header().Set("Connection", "close")
				}
			}
		}
		h.ServeHTTP(w, r)
	})
}

// signIn is what signedIn tells of a request.
type signIn int

const (
	signInNo      signIn = iota
	signInYes            // a session or API token authenticate accepts, from the LAN
	signInUnknown        // authenticate could not read the store
)

// signedIn tells whether r is one the console would serve as someone:
// from the LAN, with a session or API token that authenticate accepts.
// It is asked of every request; one with neither cookie nor token costs
// no store read, one with either the reads its handler makes again.
func (h *Handler) signedIn(r *http.Request) signIn {
	if !h.fromLAN(r.RemoteAddr) {
		return signInNo
	}
	p, err := h.authenticate(r)
	var he *httpError
	switch {
	case err == nil && p != nil:
		return signInYes
	case errors.As(err, &he) && he.code == http.StatusServiceUnavailable:
		return signInUnknown
	}
	return signInNo
}

package gateway

import (
	stdlog "log"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/connlimit"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// httpsRefusals counts and logs the TLS handshakes one of the gateway's
// own HTTPS servers (firmware, EST, console) refuses or sees fail. Anyone
// who reaches the port can cause them at the rate they can open
// connections: each is counted in bastion_https_handshake_refusals_total,
// but logged at most once per kind per httpsRefusalLogEvery, the line
// saying how many of its kind were not logged since the one before, and
// text the peer chose (a claimed device id, an error quoting a
// certificate's CN) is cut. As the MQTT and CoAP bridges log theirs
// (refusalLine there).
//
// net/http does the handshake itself and tells only its ErrorLog how it
// failed, one line per connection: errorLog is that ErrorLog. A
// certificate the server's verify callback refused is counted and logged
// there (cert), with the reason the line's text no longer carries.
type httpsRefusals struct {
	server string // the metric's server label
	prefix string // what the lines start with: "firmware https"
	log    *slog.Logger
	// level is that of the server's other ErrorLog lines (an accept
	// error, a request's trouble), which are spaced too, by kind: a
	// handler's panic is logged at Error, each one (Write).
	level slog.Level
	count *prometheus.CounterVec
	lines *ratelog.Every
}

// httpsRefusalLogEvery spaces the lines of each kind of refused handshake.
const httpsRefusalLogEvery = 10 * time.Second

func (g *Gateway) newHTTPSRefusals(server, prefix string, log *slog.Logger, level slog.Level) *httpsRefusals {
	return &httpsRefusals{server: server, prefix: prefix, log: log, level: level,
		count: g.metrics.httpsRefusals, lines: ratelog.New(httpsRefusalLogEvery)}
}

// certRefused is the error a verify callback returns for a client
// certificate that cert counted and logged. Its text names the reason
// only: the ErrorLog line of the same handshake, which quotes it, is
// recognised by it and neither counted nor logged again.
type certRefused struct {
	reason string
	err    error
}

const certRefusedText = "client certificate not accepted: "

func (e *certRefused) Error() string { return certRefusedText + e.reason }
func (e *certRefused) Unwrap() error { return e.err }

// cert counts a client certificate refused for reason with err, which
// claims to be device (unverified), logs it (spaced) and returns the
// error for the handshake.
func (r *httpsRefusals) cert(reason, device string, err error) error {
	r.refused(slog.LevelWarn, "cert:"+reason, reason, "handshake refused: device certificate not accepted",
		"device", ratelog.Clip(device, ratelog.MaxText), "reason", reason, "err", ratelog.ClipErr(err))
	return &certRefused{reason: reason, err: err}
}

// refused logs msg (spaced by kind) and counts one refusal under reason:
// the line first, so that once a test sees the count it sees the lines.
func (r *httpsRefusals) refused(level slog.Level, kind, reason, msg string, args ...any) {
	r.lines.Line(r.log, level, kind, r.prefix+": "+msg, args...)
	r.count.WithLabelValues(r.server, reason).Inc()
}

// errorLog is the http.Server's ErrorLog.
func (r *httpsRefusals) errorLog() *stdlog.Logger { return stdlog.New(r, "", 0) }

// handshakeErrorPrefix starts net/http's line about a failed handshake:
// "http: TLS handshake error from <remote>: <error>".
const handshakeErrorPrefix = "http: TLS handshake error from "

// panicPrefix starts net/http's line about a handler's panic: "http: panic
// serving <remote>: <value>\n<stack>".
const panicPrefix = "http: panic serving "

// acceptErrorPrefix starts net/http's line about a failed Accept, which
// it retries: "http: Accept error: <error>; retrying in <delay>".
const acceptErrorPrefix = "http: Accept error: "

// maxPanicStack bounds the stack of a handler's panic in its line
// (net/http's is up to 64 KiB): the frames that matter come first.
const maxPanicStack = 8 << 10

// Write takes one line of the http.Server's ErrorLog (a log.Logger writes
// each line in one call).
func (r *httpsRefusals) Write(b []byte) (int, error) {
	line := strings.TrimSuffix(string(b), "\n")
	if rest, ok := strings.CutPrefix(line, panicPrefix); ok {
		// A bug of ours: every one is logged, with its stack, never spaced
		// away behind some other line (a handler that panics on what a
		// peer sends writes one line per request, as any request's line).
		head, stack, _ := strings.Cut(rest, "\n")
		remote, value, _ := strings.Cut(head, ": ")
		r.log.Error(r.prefix+": handler panic", "remote", remote, "panic", ratelog.Clip(value, ratelog.MaxText),
			"stack", ratelog.Clip(stack, maxPanicStack))
		return len(b), nil
	}
	if strings.HasPrefix(line, acceptErrorPrefix) {
		// The listener's trouble (out of file descriptors): its own kind,
		// so that it neither hides nor is hidden by a request's lines.
		r.lines.Line(r.log, r.level, "accept", line)
		return len(b), nil
	}
	rest, ok := strings.CutPrefix(line, handshakeErrorPrefix)
	if !ok {
		// A request's trouble (a query with ';'): not per handshake, but
		// some a peer can repeat.
		r.lines.Line(r.log, r.level, "server", line)
		return len(b), nil
	}
	remote, why, _ := strings.Cut(rest, ": ")
	switch {
	case strings.HasPrefix(why, certRefusedText):
		// counted and logged by the certificate check
	case strings.HasSuffix(why, connlimit.ErrEvicted.Error()):
		// closed, counted and logged (spaced) by the connlimit.Listener's Events
		r.log.Debug(r.prefix+": TLS handshake ended: closed to make room for a newer connection", "device", "", "remote", remote)
	case why == "client sent an HTTP request to an HTTPS server" || strings.Contains(why, "first record does not look like a TLS handshake"):
		r.refused(slog.LevelWarn, hub.ReasonPlaintext, hub.ReasonPlaintext, "handshake refused: plaintext on the HTTPS port; connect with https", "remote", remote)
	case strings.Contains(why, "client didn't provide a certificate"): // crypto/tls has no sentinel for it
		r.refused(slog.LevelWarn, hub.ReasonNoCredentials, hub.ReasonNoCredentials, "handshake refused: no client certificate", "remote", remote)
	default:
		r.refused(slog.LevelInfo, hub.ReasonHandshakeFailed, hub.ReasonHandshakeFailed, "TLS handshake failed", "remote", remote,
			"err", ratelog.Clip(why, ratelog.MaxText))
	}
	return len(b), nil
}

// unauthLimitMsg is the line for a connection the bounds of the
// unauthenticated closed, by bound.
var unauthLimitMsg = map[bridges.Bound]string{
	bridges.BoundSource: "connection refused: too many not yet authenticated from this address (TLS handshake or first request pending)",
	bridges.BoundPrefix: "oldest unauthenticated connection of this IPv6 /64 closed: too many not yet authenticated from the /64",
	bridges.BoundTotal:  "oldest unauthenticated connection closed: too many not yet authenticated in all",
}

// connEvents counts and logs, as r's refusals, each connection a
// connlimit.Listener closes: one the bounds of the unauthenticated (unauth,
// perAddr per address, perPrefix per IPv6 /64, all in all) turn away or
// push out, one pushed out because the listener holds maxConns, one
// refused because all of those are authenticated. The firmware and EST
// listeners share it.
func (r *httpsRefusals) connEvents(unauth *bridges.SourceLimit[net.Conn], perAddr, perPrefix, all, maxConns int) connlimit.Events {
	return connlimit.Events{
		Limited: func(c net.Conn, src bridges.Source, by bridges.Bound) {
			args := []any{"device", "", "remote", c.RemoteAddr().String(),
				"from_this_address", unauth.From(src.Addr), "per_address_limit", perAddr}
			if src.Prefix.IsValid() {
				args = append(args, "prefix", src.Prefix.String(), "from_this_prefix", unauth.In(src.Prefix), "per_prefix_limit", perPrefix)
			}
			args = append(args, "in_all", unauth.Len(), "limit", all)
			r.refused(slog.LevelWarn, hub.ReasonHandshakeLimit+":"+by.String(), hub.ReasonHandshakeLimit, unauthLimitMsg[by], args...)
		},
		PushedOut: func(c net.Conn) {
			r.refused(slog.LevelWarn, hub.ReasonHandshakeLimit+":conns", hub.ReasonHandshakeLimit,
				"oldest unauthenticated connection closed: the listener's connections are all in use",
				"device", "", "remote", c.RemoteAddr().String(), "not_authenticated", unauth.Len(), "limit", maxConns)
		},
		Refused: func(c net.Conn) {
			r.refused(slog.LevelWarn, "conn_limit", "conn_limit",
				"connection refused: the listener's connections are all in use, every one authenticated",
				"remote", c.RemoteAddr().String(), "limit", maxConns)
		},
	}
}

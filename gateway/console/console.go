// Package console serves the integrators' HTTPS console and JSON API. It
// listens only with TLS (certificate from the local CA), sets strict
// security headers on every answer, and never offers a way to open the
// pairing window.
package console

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"html/template"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// Server is the console's HTTPS server.
type Server struct {
	ln  net.Listener
	srv *http.Server
	log *slog.Logger
}

// New binds addr with tlsConf; handler serves the pages and API (nil for
// the built-in placeholder until the console is complete). errorLog is
// the HTTP server's ErrorLog, which net/http tells of every failed TLS
// handshake: anyone on the network can fail one per connection, so the
// caller gives one that counts them and spaces its lines; nil logs each
// to log at debug level. The connections are bounded (limitConns):
// refused is told of each closed for room, and should count and space
// them the same way; nil logs each to log.
func New(addr string, tlsConf *tls.Config, handler http.Handler, log *slog.Logger, errorLog *stdlog.Logger, refused Refused) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("console: listen tcp %s: %w", addr, err)
	}
	if handler == nil {
		handler = placeholder()
	}
	clog := log.With("component", "console")
	if refused == nil {
		refused = func(level slog.Level, _, _, msg string, args ...any) {
			clog.Log(context.Background(), level, "console: "+msg, args...)
		}
	}
	s := &Server{ln: tls.NewListener(limitConns(ln, refused), tlsConf), log: clog}
	if errorLog == nil {
		errorLog = slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
	}
	s.srv = &http.Server{
		Handler:           SecurityHeaders(claimSignedIn(handler)),
		ConnContext:       withConn,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    32 << 10,
		ErrorLog:          errorLog,
	}
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Run serves until ctx ends, then shuts down with a deadline.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	s.log.Info("console: listening", "addr", "https://"+s.ln.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("console: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil {
		// A client that holds its connection past the deadline (one that
		// never finishes sending its request) is closed on, as the
		// firmware and EST servers do: it is no reason for the gateway's
		// stop to fail.
		s.log.Warn("console: connections still open at the shutdown deadline; closing them", "err", err)
		s.srv.Close()
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("console: %w", err)
	}
	return nil
}

// SecurityHeaders adds the headers every console answer carries: HSTS, a
// CSP with no inline script and no external origin, no framing, no
// sniffing, no referrer.
func SecurityHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Strict-Transport-Security", "max-age=31536000")
		hd.Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		hd.Set("Cross-Origin-Opener-Policy", "same-origin")
		hd.Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

var placeholderPage = template.Must(template.New("p").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bastion console</title></head>
<body><h1>Bastion</h1><p>The gateway is running. The console's pages are not installed in this build.</p></body></html>
`))

func placeholder() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		placeholderPage.Execute(w, nil)
	})
	return mux
}

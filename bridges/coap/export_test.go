package coap

import (
	"net/netip"
	"time"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// SetAcceptTimeout bounds s's confirmable requests' wait for the Sink (the
// acceptTimeout constant otherwise), for tests of the deadline; call it
// before Run.
func SetAcceptTimeout(s *Server, d time.Duration) { s.deadline.Timeout = d }

// HubOf is the hub s hands telemetry to, for its counters.
func HubOf(s *Server) *hub.Hub { return s.hub }

// Observe registration stages for SetObserveHook.
const (
	HookRouted     = hookRouted
	HookRegistered = hookRegistered
)

// SetObserveHook has f run on the handler's goroutine at each stage of a
// GET /c Observe registration; call it before Run.
func SetObserveHook(s *Server, f func(stage int)) { s.observeHook = f }

// HandshakesInFlight is how many DTLS handshakes s counts as in flight
// (limit.go).
func HandshakesInFlight(s *Server) int { return s.hs.Len() }

// HandshakesInFlightFrom is how many DTLS handshakes s counts as in
// flight from the address addr.
func HandshakesInFlightFrom(s *Server, addr string) int {
	return s.hs.From(netip.MustParseAddr(addr))
}

// SetHandshakeHook has f run on a handshake's goroutine once the
// handshake has succeeded, before its slot among the handshakes in flight
// is claimed; it may be called while s runs.
func SetHandshakeHook(s *Server, f func()) { s.handshakeHook.Store(&f) }

// EnrollSessions is how many enrollment sessions s counts against its
// bounds (enrolllimit.go).
func EnrollSessions(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.enrolling.open)
}

// SetCloseHook has f run on the goroutine that closes the sessions a
// revocation, the certificate sweep or the window's close took out,
// before it closes them; it may be called while s runs.
func SetCloseHook(s *Server, f func()) { s.closeHook.Store(&f) }

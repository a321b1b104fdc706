package coap

import (
	"slices"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// Enrollment sessions (every kind but KindDevice) are bounded in all and
// per source, not only per identity (maxSessionsPerDevice). The PAKE's
// PSK is public (pairing.PublicPAKEPSK: a hash of the id the peer names),
// so while a pairing window is open anyone on the LAN completes a
// handshake as "pake:<any id>", and each id is a device of its own to
// maxSessionsPerDevice. A session holds a pion connection and go-coap's
// state (kilobytes) until the window closes or it idles out (10 min): a
// host doing thousands of handshakes a second could hold hundreds of
// megabytes within one window, past the gateway's memory limit. One device pairs
// per window and needs two sessions at once (the PAKE's, then its
// enrollment's), so the bounds are small.
//
// Past a bound the oldest session is closed to make room, not the new one
// refused, for the reason bridges.SourceLimit evicts past its /64's bound
// and its total: refused, a host holding the places with idle sessions
// kept the owner's device from pairing for the whole window; now it must
// open sessions faster than the device pairs to close the device's. A
// source (an IPv4 address, or an IPv6 /64, which every IPv6 host of the
// link shares) at its own bound closes its own oldest: an IPv4 host at one
// address never closes another's session, an IPv6 host can close the
// sessions of its /64's other hosts, and past the total the oldest of all
// is closed.
const (
	maxEnrollSessions  = 8
	maxEnrollPerSource = 4
)

// enrollLimit is the open enrollment sessions, oldest first; under
// Server.mu. A session is in it exactly while it is in byDevice: whoever
// takes one out of byDevice takes it out here too (forget), so a session
// being closed is neither counted nor chosen to be closed again, as
// onNewConn's takeover past maxSessionsPerDevice does for a device's.
type enrollLimit struct {
	open []enrollSession
}

// enrollSession is one enrollment session in an enrollLimit.
type enrollSession struct {
	cc     *otacache.DTLSConn
	device string
	src    bridges.Source
}

// sameSource reports whether a and b count as one source: one IPv4
// address, or one IPv6 /64 (its host can take any address of it; a
// link-local one per interface).
func sameSource(a, b bridges.Source) bool {
	if a.Prefix.IsValid() || b.Prefix.IsValid() {
		return a.Prefix == b.Prefix
	}
	return a.Addr == b.Addr
}

// Bounds of an enrollLimit that close a session (add).
const (
	enrollBoundSource = "source"
	enrollBoundTotal  = "total"
)

// add counts e and returns the session it closes to make room, taken out
// of l (ok false: none): its source's oldest if its source is at
// maxEnrollPerSource, or else the oldest of all if all are at
// maxEnrollSessions; by names the bound.
func (l *enrollLimit) add(e enrollSession) (old enrollSession, by string, ok bool) {
	from, first := 0, -1
	for i, o := range l.open {
		if sameSource(o.src, e.src) {
			if first < 0 {
				first = i
			}
			from++
		}
	}
	switch {
	case from >= maxEnrollPerSource:
		old, by, ok = l.open[first], enrollBoundSource, true
		l.open = slices.Delete(l.open, first, first+1)
	case len(l.open) >= maxEnrollSessions:
		old, by, ok = l.open[0], enrollBoundTotal, true
		l.open = slices.Delete(l.open, 0, 1)
	}
	l.open = append(l.open, e)
	return old, by, ok
}

// forget takes cc out of l if it is there.
func (l *enrollLimit) forget(cc *otacache.DTLSConn) {
	if i := slices.IndexFunc(l.open, func(e enrollSession) bool { return e.cc == cc }); i >= 0 {
		l.open = slices.Delete(l.open, i, i+1)
	}
}

// endEnrollSession closes old, an enrollment session taken out of
// byDevice and the enrollLimit to make room for cc's (by: the bound),
// counted as session_taken_over (a newer session took its place) and
// logged at most once per bound per refusalLogEvery: anyone can open
// them, under any id, so the line names the closed session's id cut.
func (s *Server) endEnrollSession(old enrollSession, by string, cc *otacache.DTLSConn) {
	limit := maxEnrollSessions
	msg := "coap: oldest enrollment session closed to make room for a newer one: too many enrollment sessions open in all"
	if by == enrollBoundSource {
		limit = maxEnrollPerSource
		msg = "coap: oldest enrollment session of this source closed to make room for a newer one: too many enrollment sessions open from this source"
	}
	s.refusalLine("enroll_limit:"+by, msg, "device", ratelog.Clip(old.device, ratelog.MaxText),
		"old_remote", old.cc.RemoteAddr().String(), "remote", cc.RemoteAddr().String(), "limit", limit)
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonSessionTakenOver).Inc()
	old.cc.Close()
}

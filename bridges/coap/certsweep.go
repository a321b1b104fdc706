package coap

import (
	"context"

	"github.com/bastion-iot/bastion/bridges/hub"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// A certificate session ends when its certificate does: once the gateway's
// clock (the CA's) passes the leaf's NotAfter, or its serial is retired
// (renewed: Revocations.RetireSerial) or revoked. The handshake checked
// the certificate once; without this a session outlived it as long as the
// device kept it busy (the idle timeout, 10 min, ends only a quiet one).
// A revoked device's sessions are closed at once by revoke (OnRevoke);
// this also covers what notifies no one: time passing NotAfter or a
// retirement time, RetireSerial, RevokeSerial.
//
// One sweep every CertSweep (5 s): see hub.SweepCerts for why and what
// it costs.
func (s *Server) sweepCerts(ctx context.Context) {
	hub.SweepCerts(ctx, s.cfg.CertSweep, s.endInvalidCerts)
}

// endInvalidCerts closes the certificate sessions whose certificate
// CertValid refuses now; buf is the snapshot's buffer, returned emptied
// for the next sweep.
func (s *Server) endInvalidCerts(buf []*session) []*session {
	s.mu.Lock()
	for _, l := range s.byDevice {
		for _, cc := range l {
			if se := s.sessionOf(cc); se != nil && se.cert != nil {
				buf = append(buf, se)
			}
		}
	}
	s.mu.Unlock()
	type ended struct {
		se  *session
		err error
	}
	var end []ended
	for _, se := range buf {
		if err := s.id.CertValid(se.device, se.cert.Serial, se.cert.NotAfter); err != nil {
			end = append(end, ended{se, err})
		}
	}
	clear(buf) // holds no session until the next sweep
	buf = buf[:0]
	if len(end) == 0 {
		return buf
	}
	// Ended as revoke ends a session: taken out of byDevice and marked
	// ended (its requests refused from then on), counted and logged, then
	// closed on a goroutine of its own (closeLater). One gone already is
	// not counted again: ended meanwhile by a revocation or a takeover,
	// which counted it, or closed.
	ccs := make([]*otacache.DTLSConn, 0, len(end))
	s.mu.Lock()
	for i, e := range end {
		if !s.takeOutLocked(e.se.device, e.se.cc) {
			end[i].se = nil
			continue
		}
		e.se.ended.Store(hub.CertRefusal(e.err))
		ccs = append(ccs, e.se.cc)
	}
	s.mu.Unlock()
	for _, e := range end {
		if e.se != nil {
			hub.CertSessionEnded(s.m, s.log, hub.CoAP, e.se.device, e.se.cc.RemoteAddr().String(), e.se.cert, e.err)
		}
	}
	s.closeLater(ccs)
	return buf
}

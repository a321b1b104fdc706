package mqtt

import (
	"context"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// A certificate session ends when its certificate does: once the gateway's
// clock (the CA's) passes the leaf's NotAfter, or its serial is retired
// (renewed: Revocations.RetireSerial) or revoked. The CONNECT checked the
// certificate once; without this a session lived as long as the device
// sent keepalives. A revoked device's sessions are closed at once by
// disconnect (OnRevoke); this also covers what notifies no one: time
// passing NotAfter or a retirement time, RetireSerial, RevokeSerial.
// Secret-login sessions have no certificate and are not affected.
//
// One sweep every CertSweep (5 s): see hub.SweepCerts for why and what
// it costs.
func (s *Server) sweepCerts(ctx context.Context) {
	hub.SweepCerts(ctx, s.cfg.CertSweep, s.endInvalidCerts)
}

// endInvalidCerts ends the certificate sessions whose certificate
// CertValid refuses now, as revocation does (closeSession: DISCONNECT
// 0x87 to an MQTT 5 device if it can be written in time, no Will, nothing
// taken after); buf is the snapshot's buffer, returned emptied for the
// next sweep.
func (s *Server) endInvalidCerts(buf []*pipeConn) []*pipeConn {
	s.mu.Lock()
	for _, l := range s.conns {
		for _, pc := range l {
			if pc.cert != nil { // set only when accepted
				buf = append(buf, pc)
			}
		}
	}
	s.mu.Unlock()
	// One deadline for every session this sweep ends: each waits at most
	// until then for its DISCONNECT, so a sweep ending many sessions of
	// devices that stopped reading takes endWait, not endWait each.
	var deadline time.Time
	for _, pc := range buf {
		cl := pc.cl
		// pc.cert and pc.cl were set under s.mu before the snapshot and
		// are not changed after.
		err := s.id.CertValid(cl.ID, pc.cert.Serial, pc.cert.NotAfter)
		// refused: ended and counted once, also when a revocation
		// (disconnect) or an earlier sweep got to it first.
		if err == nil || cl.Closed() || !pc.refused.CompareAndSwap(false, true) {
			continue
		}
		why := hub.CertSessionEnded(s.m, s.log, hub.MQTT, cl.ID, cl.Net.Remote, pc.cert, err)
		if deadline.IsZero() {
			deadline = time.Now().Add(endWait)
		}
		s.endSession(cl, packets.Code{Code: packets.ErrNotAuthorized.Code, Reason: "session ended: " + why}, deadline)
	}
	clear(buf) // holds no connection until the next sweep
	return buf[:0]
}

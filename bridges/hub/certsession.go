package hub

import (
	"context"
	"crypto/x509"
	"log/slog"
	"time"

	"github.com/bastion-iot/bastion/pki"
)

// DefaultCertSweep is how often a transport checks the certificates of its
// open certificate sessions (Identity.CertValid) by default: a session
// outlives the end of its certificate by at most this long.
const DefaultCertSweep = 5 * time.Second

// SessionCert is what a transport keeps, from a session's establishment,
// of the certificate the session was authenticated with: what
// Identity.CertValid needs to tell when the session must end (with the
// session's device), without verifying the chain again.
type SessionCert struct {
	Serial   string // pki.Serial of the leaf
	NotAfter time.Time
}

// NewSessionCert is the SessionCert of a session whose leaf certificate
// is leaf.
func NewSessionCert(leaf *x509.Certificate) *SessionCert {
	return &SessionCert{Serial: pki.Serial(leaf), NotAfter: leaf.NotAfter}
}

// CertEnd is, for err, an Identity.CertValid error, the refusal reason a
// session closed for it is counted under, why it was closed and what the
// device must do, for the session's log line.
func CertEnd(err error) (reason, why, todo string) {
	reason = CertRefusal(err)
	switch reason {
	case ReasonCertRetired:
		return reason, "its certificate was replaced by a renewal (retired)",
			"the device must connect with its renewed certificate; one that lost it must enroll again"
	case ReasonExpired:
		return reason, "its certificate expired",
			"the device must enroll again (an expired certificate cannot renew); renew before the certificate's end (EST /sren) to keep it connected"
	case ReasonRevoked:
		return reason, "its certificate or device was revoked",
			"the device must enroll again for a new certificate"
	}
	return reason, "its certificate is no longer accepted", "the device must enroll again"
}

// CertSessionEnded counts, for transport, the end of a certificate session
// whose certificate CertValid refused with err (cert), under CertEnd's
// reason, and logs it with the device, the certificate and what the device
// must do. It returns why the session was closed (MQTT also says it in its
// DISCONNECT). The transport calls it once per session it ends.
func CertSessionEnded(m *Metrics, log *slog.Logger, transport, device, remote string, cert *SessionCert, err error) (why string) {
	reason, why, todo := CertEnd(err)
	m.Refused.WithLabelValues(transport, reason).Inc()
	log.Warn(transport+": session closed: "+why+"; "+todo, "device", device, "serial", cert.Serial,
		"not_after", cert.NotAfter.UTC().Format(time.RFC3339), "reason", reason, "remote", remote, "err", err)
	return why
}

// SweepCerts runs sweep every interval until ctx ends: a transport's
// pass over its certificate sessions, which takes the buffer the last pass
// returned (its snapshot's, emptied) so that a pass allocates nothing once
// the buffer has grown.
//
// One pass per interval (CertSweep, 5 s) over the open sessions, not a
// timer per session: a retirement or a serial's revocation is not
// announced, so it has to be looked for anyway, and one periodic pass
// finds all three causes (NotAfter passed, retired, revoked). A pass costs
// each certificate session an append under the transport's lock (the
// snapshot: a map walk, of the order of 0.1 ms of the lock for 10,000
// sessions, estimated), then one CertValid outside the lock (a clock read
// and two map lookups under a read lock; no chain is verified: 0.7 ms for
// 10,000, measured once on the 2-CPU development machine), and no memory
// per session but its SessionCert. A timer per session would cost each
// session a runtime timer and still need the pass. A session outlives its
// certificate by at most the interval.
func SweepCerts[T any](ctx context.Context, every time.Duration, sweep func(buf []T) []T) {
	t := time.NewTicker(every)
	defer t.Stop()
	var buf []T
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		buf = sweep(buf)
	}
}

package gateway

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
)

// Certificate renewal (EST /sren) retires the certificate it replaces, so
// that a device that rotates its key after a suspected theft leaves the
// thief nothing:
//
//   - The old certificate is refused at every handshake (both transports,
//     through pki.CA.VerifyDevice) from renewGrace after the renewal, or
//     as soon as the new certificate is first used in a handshake,
//     whichever comes first. The retirement time is persisted with the
//     old certificate's record (store.Cert.RetireAt), so a restart keeps
//     it; the earlier first-use time is kept in memory only (a restart
//     falls back to the grace).
//   - During the grace the old certificate may still connect, but not
//     renew again: a device whose answer was lost and asks again with the
//     same key gets the same certificate back (nothing signed or written),
//     any other request is refused. After a restart that resend is not
//     possible (the issued certificate is kept in memory only).
//   - A device renews at most once per renewInterval (counted in memory
//     since start); an expired, revoked or retired certificate cannot
//     renew (each counted under its own result); a renewal whose record
//     cannot be written is answered 5.00 and retires nothing.
//   - The records of renewed certificates are deleted once they have
//     expired (store.PruneRetiredCerts), a bounded number at each renewal
//     and all at start: expired, the certificate is refused by every check
//     anyway, and a device renewing every hour would otherwise leave 8,760
//     records a year, which every revocation and certificate view reads.
//     The in-memory retirement (pki.Revocations) is loaded at start only
//     for certificates not yet expired, and dropped once expired, a
//     bounded number at each later retirement.
//
// Open sessions made with the old certificate end once it is retired (at
// the new certificate's first use, or after the grace): both transports
// check their certificate sessions every few seconds (identity.CertValid,
// pki.CA.CertValid) and close those on a retired, revoked or expired
// certificate; the device's sessions on its new certificate stay up.
const (
	renewGrace    = 10 * time.Minute
	renewInterval = time.Hour
)

// renewStore is what renewals need from the store.
type renewStore interface {
	// RecordRenewal also deletes, in the same transaction, a bounded
	// number of records of renewed certificates expired before now.
	RecordRenewal(old, renewed store.Cert, now time.Time) error
}

type renewal struct {
	at     time.Time
	from   string // serial of the certificate renewed
	issued *x509.Certificate
}

type renewals struct {
	// mu serialises renewals (an ECDSA signature and an fsynced write
	// each), so that one device's concurrent requests see each other.
	mu    sync.Mutex
	store renewStore
	last  map[string]renewal // device → its last renewal since start
	// newMu guards byNew, read on every certificate handshake.
	newMu sync.Mutex
	byNew map[string]replaced // serial issued → the certificate it replaces, until first used
}

// replaced is what certUsed retires: a renewed certificate's serial and its
// NotAfter, after which its retirement is dropped (pki.Revocations.RetireCert).
type replaced struct {
	serial   string
	notAfter time.Time
}

// renewCert answers /sren for device, whose session certificate is r.Peer.
func (p *pairingSvc) renewCert(ctx context.Context, h est.Handler, device string, r est.Request) est.Response {
	rn := &p.renew
	rn.mu.Lock()
	defer rn.mu.Unlock()
	revs := p.g.ca.Revocations()
	now := p.g.ca.Clock().Now()
	old := r.Peer
	serial := pki.Serial(old)
	refuse := func(result string, code est.Code, err error) est.Response {
		p.g.metrics.renewals.WithLabelValues(result).Inc()
		return estRefuse(code, fmt.Errorf("est sren %s: %w", device, err))
	}
	if now.Before(old.NotBefore) || now.After(old.NotAfter) {
		return refuse("expired", est.Forbidden, fmt.Errorf("certificate %s expired at %s: enroll again in a pairing window",
			serial, old.NotAfter.UTC().Format(time.RFC3339)))
	}
	if revs.Revoked(device, serial) {
		return refuse("revoked", est.Forbidden, fmt.Errorf("certificate %s: %w", serial, pki.ErrRevoked))
	}
	if revs.Retired(serial, now) {
		// Reached by a session opened with the certificate before it was
		// retired, until the sweep closes it. Not a revocation (pki refuses
		// it as one, and wraps pki.ErrCertRetired too so that it can be
		// told apart): the device holds a newer certificate, and told
		// "revoked" it would re-pair for nothing. Checked after the
		// revocation, which a revoked device's newer certificate shares.
		return refuse("retired", est.Forbidden, fmt.Errorf("certificate %s: %w: renew with the newer certificate issued at its last renewal, or pair again if the device lost it",
			serial, pki.ErrCertRetired))
	}
	last, renewed := rn.last[device]
	if at, retiring := revs.RetireAt(serial); retiring {
		if renewed && last.from == serial && sameKey(r.Payload, device, last.issued) {
			p.g.metrics.renewals.WithLabelValues("resent").Inc()
			p.g.log.Info("est sren: the certificate issued for this key is sent again (the first answer was lost?)",
				"device", device, "serial", pki.Serial(last.issued))
			return issuedResponse(last.issued, r.Accept)
		}
		return refuse("superseded", est.Forbidden, fmt.Errorf("certificate %s was renewed already and is refused from %s: use the certificate issued then",
			serial, at.UTC().Format(time.RFC3339)))
	}
	if renewed && now.Sub(last.at) < renewInterval {
		return refuse("rate_limited", est.TooManyRequests, fmt.Errorf("renewed at %s already: one renewal per %s, the next from %s",
			last.at.UTC().Format(time.RFC3339), renewInterval, last.at.Add(renewInterval).UTC().Format(time.RFC3339)))
	}
	h.Now = p.g.ca.Clock().Now
	resp := h.Handle(ctx, r)
	if resp.Issued == nil {
		p.g.metrics.renewals.WithLabelValues("refused").Inc()
		return resp
	}
	newSerial := pki.Serial(resp.Issued)
	retireAt := now.Add(renewGrace)
	if err := rn.store.RecordRenewal(store.Cert{Serial: serial, Device: device, NotAfter: old.NotAfter, RetireAt: retireAt},
		store.Cert{Serial: newSerial, Device: device, NotAfter: resp.Issued.NotAfter}, now); err != nil {
		p.g.log.Error("est sren: renewal not recorded; certificate withheld, the old one stays valid", "device", device, "serial", serial, "err", err)
		return refuse("store_failed", est.InternalServerError, fmt.Errorf("record renewal of %s: %w; the certificate presented stays valid, retry later", serial, err))
	}
	revs.RetireCert(serial, retireAt, old.NotAfter)
	rn.last[device] = renewal{at: now, from: serial, issued: resp.Issued}
	rn.newMu.Lock()
	rn.byNew[newSerial] = replaced{serial: serial, notAfter: old.NotAfter}
	rn.newMu.Unlock()
	p.g.metrics.renewals.WithLabelValues("issued").Inc()
	p.event("device:"+device, "device.renew", device, "serial "+newSerial+" replaces "+serial+", refused from "+retireAt.UTC().Format(time.RFC3339))
	return resp
}

// certUsed retires at once the certificate that leaf replaced, if leaf is
// a renewed certificate used for the first time: the device has it.
func (p *pairingSvc) certUsed(device string, leaf *x509.Certificate) {
	rn := &p.renew
	serial := pki.Serial(leaf)
	rn.newMu.Lock()
	old, ok := rn.byNew[serial]
	delete(rn.byNew, serial)
	rn.newMu.Unlock()
	if ok {
		p.g.ca.Revocations().RetireCert(old.serial, p.g.ca.Clock().Now(), old.notAfter)
		p.g.log.Info("renewed certificate in use: the certificate it replaces is refused from now on", "device", device, "serial", serial, "retired", old.serial)
	}
}

// sameKey reports whether the CSR asks for issued's public key.
func sameKey(csrDER []byte, device string, issued *x509.Certificate) bool {
	csr, _, err := est.ParseCSR(csrDER, device)
	if err != nil {
		return false
	}
	k, ok := issued.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(csr.PublicKey)
}

// issuedResponse answers with cert as est.Handler does for accept.
func issuedResponse(cert *x509.Certificate, accept int) est.Response {
	if accept == est.FormatCertsOnly {
		der, err := est.EncodeCertsOnly([]*x509.Certificate{cert})
		if err != nil {
			return estRefuse(est.InternalServerError, fmt.Errorf("est sren: %w", err))
		}
		return est.Response{Code: est.Changed, ContentFormat: est.FormatCertsOnly, Payload: der, Issued: cert}
	}
	return est.Response{Code: est.Changed, ContentFormat: est.FormatPKIXCert, Payload: cert.Raw, Issued: cert}
}

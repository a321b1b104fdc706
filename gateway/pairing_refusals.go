package gateway

import (
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/internal/ratelog"
)

// Pairing refusals are made by whoever reaches the gateway's DTLS ports or
// its EST port, unauthenticated, at the rate they can handshake or send:
// a DTLS-PSK handshake with an enrollment identity when no window is open
// (nearly always), a manufacturer certificate of no configured vendor
// while one is, a malformed PAKE message. Each is counted
// (bastion_pairing_sessions_refused_total for the sessions), but the
// audit log, an fsynced transaction in the store per event, gets at most
// one event per kind of refusal per pairingRefusalAuditEvery: the first at
// once, so that an operator watching a device fail to pair sees why, the
// others counted into the next event of the kind ("N more refused since
// ..."). The window opening or closing writes the counts still held
// and starts every kind afresh, so each window's first refusal of each
// kind is audited at once and its counts are in the log when it closes.
// The log gets at most one line per kind per pairingRefusalLogEvery, and
// the text a peer chose (a claimed device id, a certificate's CN) is cut
// to maxPairingClaim bytes in the audit, the log and the error.

// pairingRefusalAuditEvery spaces the audit events of each kind of pairing
// refusal. A flood outside any window (two kinds: a bad identity, no
// window) adds at most about 2,900 events a day to an audit log that keeps
// its newest 10,000 (store.DefaultAuditRetention).
const pairingRefusalAuditEvery = time.Minute

// pairingRefusalLogEvery spaces the log lines of each kind.
const pairingRefusalLogEvery = 10 * time.Second

// maxPairingClaim bounds the text a peer chose in an audit event, log line
// or error about a refusal: the longest device id an enrollment identity
// may carry.
const maxPairingClaim = 128

// refusalAudit decides which pairing refusals are audited: for each kind
// (from a fixed set: an action and a reason, never peer text), the first,
// and then the first after the interval has passed since the kind's last
// event, which carries how many were not audited since.
type refusalAudit struct {
	every time.Duration
	mu    sync.Mutex
	kinds map[string]*refusalTally
}

type refusalTally struct {
	action, reason string
	last           time.Time // when its last event was written
	quiet          int       // its refusals not audited since then
}

// heldRefusals is a kind's count of refusals not audited since its last
// event, at since.
type heldRefusals struct {
	action, reason string
	n              int
	since          time.Time
}

func newRefusalAudit(every time.Duration) *refusalAudit {
	return &refusalAudit{every: every, kinds: map[string]*refusalTally{}}
}

// note counts one refusal of its kind at now and reports whether to audit
// it, and if so how many of the kind were not audited since the kind's
// last event, at since.
func (r *refusalAudit) note(action, reason string, now time.Time) (quiet int, since time.Time, audit bool) {
	kind := action + "\x00" + reason
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.kinds[kind]
	if t == nil {
		r.kinds[kind] = &refusalTally{action: action, reason: reason, last: now}
		return 0, time.Time{}, true
	}
	if d := now.Sub(t.last); d >= 0 && d < r.every {
		t.quiet++
		return 0, time.Time{}, false
	}
	quiet, since = t.quiet, t.last
	t.last, t.quiet = now, 0
	return quiet, since, true
}

// reset forgets every kind and returns the counts still held, in no
// particular order.
func (r *refusalAudit) reset() []heldRefusals {
	r.mu.Lock()
	defer r.mu.Unlock()
	var held []heldRefusals
	for _, t := range r.kinds {
		if t.quiet > 0 {
			held = append(held, heldRefusals{action: t.action, reason: t.reason, n: t.quiet, since: t.last})
		}
	}
	clear(r.kinds)
	return held
}

// notAudited says n refusals since since were not audited one by one.
func notAudited(n int, since time.Time) string {
	return strconv.Itoa(n) + " more refused since " + since.UTC().Format(time.RFC3339) + ", not audited one by one"
}

// refusal audits (spaced by kind) and logs (spaced by kind) a refusal of
// something an unauthenticated peer sent: action is the audit action,
// reason one of a fixed set, target the device the peer claims (cut
// here), detail the gateway's own words (cut too, in case they quote the
// peer). The caller counts it in its metric.
func (p *pairingSvc) refusal(msg, action, reason, target, detail string) {
	target = ratelog.Clip(target, maxPairingClaim)
	detail = ratelog.Clip(detail, 2*maxPairingClaim)
	if n, ok := p.refusalLines.Allow(action+"\x00"+reason, time.Now()); ok {
		p.g.log.Info("pairing: "+msg, "reason", reason, "device", target, "detail", detail, "not_logged_since_last_line", n)
	}
	n, since, ok := p.refusalAudit.note(action, reason, p.g.clock.Now())
	if !ok {
		return
	}
	detail = reason + ": " + detail
	if n > 0 {
		detail += "; " + notAudited(n, since)
	}
	p.event("pairing", action, target, detail)
}

// flushRefusals audits the refusal counts not audited yet and starts every
// kind afresh: when the window opens or closes, so that the counts of a
// window are in the log when it closes, and its first refusal of each kind
// is audited at once, and when the gateway stops, so that none is lost.
// when says which ("as the window closed").
func (p *pairingSvc) flushRefusals(when string) {
	for _, h := range p.refusalAudit.reset() {
		p.event("pairing", h.action, "", fmt.Sprintf("%s: %s (written %s)", h.reason, notAudited(h.n, h.since), when))
	}
}

package gateway

import (
	"fmt"
	"log/slog"
	"strings"
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

// refusal audits (spaced by kind) and logs (spaced by kind) a refusal of
// something an unauthenticated peer sent: action is the audit action,
// reason one of a fixed set, target the device the peer claims (cut
// here), detail the gateway's own words (cut too, in case they quote the
// peer). The caller counts it in its metric.
func (p *pairingSvc) refusal(msg, action, reason, target, detail string) {
	target = ratelog.Clip(target, maxPairingClaim)
	detail = ratelog.Clip(detail, 2*maxPairingClaim)
	p.refusalLines.Line(p.g.log, slog.LevelInfo, action+"\x00"+reason, "pairing: "+msg, "reason", reason, "device", target, "detail", detail)
	n, since, ok := p.refusalAudit.Note(action+"\x00"+reason, p.g.clock.Now())
	if !ok {
		return
	}
	detail = reason + ": " + detail
	if n > 0 {
		detail += "; " + ratelog.NotAudited(n, since)
	}
	p.event("pairing", action, target, detail)
}

// flushRefusals audits the refusal counts not audited yet and starts every
// kind afresh: when the window opens or closes, so that the counts of a
// window are in the log when it closes, and its first refusal of each kind
// is audited at once, and when the gateway stops, so that none is lost.
// when says which ("as the window closed").
func (p *pairingSvc) flushRefusals(when string) {
	for _, h := range p.refusalAudit.Reset() {
		action, reason, _ := strings.Cut(h.Kind, "\x00")
		p.event("pairing", action, "", fmt.Sprintf("%s: %s (written %s)", reason, ratelog.NotAudited(h.N, h.Since), when))
	}
}

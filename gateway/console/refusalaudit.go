package console

import (
	"context"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/internal/ratelog"
)

// Failed logins and refused setup and recovery codes are made by whoever
// reaches the console from the LAN, unauthenticated, at the rate the
// throttle and argon2id let them: one host rotating through the addresses
// of its /64 and through user names is slowed by the /64's key, but many
// hosts are not. Each is counted (bastion_console_refusals_total
// {reason="bad_login"} and {reason="bad_code"}), but the audit log, which
// keeps only its newest events (store.DefaultAuditRetention), gets at most
// one event per kind (console.login_failed, console.setup_refused,
// console.recover_refused, and console.csrf_refused, which any signed-in
// user can make, per user) per refusalAuditEvery: the first at once, so
// that an operator sees that and who, the others counted into the next
// event of the kind ("N more refused since ..."). A successful login,
// setup or recovery writes the counts still held and starts every kind
// afresh, so the failures before it are in the log when the operator is.
// As gateway/pairing_refusals.go does for pairing refusals.
//
// A CSRF refusal comes from a signed-in user: its events are spaced per
// user and the counts written at a flush name that user. Spaced per kind
// alone, one viewer's flood held back a later refusal against the admin's
// session (a forged request riding it) as a count written as "anonymous".

// refusalAuditEvery spaces the audit events of each kind: a flood of
// failed logins, recovery codes and CSRF tokens adds at most about 4,300
// events a day.
const refusalAuditEvery = time.Minute

// refusalAudit audits a refusal of kind action (one of a fixed set),
// spaced per kind: the first, then the first after refusalAuditEvery since
// the kind's last event, with how many were not audited since. The caller
// counts every one (h.fail, by reason).
func (h *Handler) refusalAudit(ctx context.Context, who Actor, action, target, detail string) {
	n, since, ok := h.refusalEvents.Note(refusalKind(who, action), h.o.Now())
	if !ok {
		return
	}
	if n > 0 {
		if detail != "" {
			detail += "; "
		}
		detail += ratelog.NotAudited(n, since)
	}
	h.audit(ctx, who, action, target, detail)
}

// flushRefusalAudit audits the refusal counts not audited yet, one event
// per kind, and starts every kind afresh: at a successful login, setup or
// recovery (what).
func (h *Handler) flushRefusalAudit(ctx context.Context, what string) {
	for _, held := range h.refusalEvents.Reset() {
		who := Actor{Name: "anonymous"}
		action, user, signedIn := strings.Cut(held.Kind, "\x00")
		if signedIn {
			who = Actor{Name: user}
		}
		h.audit(ctx, who, action, "", ratelog.NotAudited(held.N, held.Since)+" (written at a successful "+what+")")
	}
}

// refusalKind is what refusalAudit spaces a refusal by: its action, and
// for a CSRF refusal its user too (who.Name after a NUL, which no action
// holds; flushRefusalAudit takes it back as the actor). The users are the
// console's accounts: a small set.
func refusalKind(who Actor, action string) string {
	if action == "console.csrf_refused" {
		return action + "\x00" + who.Name
	}
	return action
}

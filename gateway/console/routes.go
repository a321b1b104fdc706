package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

type access int

// maxAuditPath is how much of a refused request's path the audit event
// keeps (ratelog.Clip).
const maxAuditPath = 128

const (
	public access = iota
	viewer
	admin
)

type handlerFunc func(w http.ResponseWriter, r *http.Request, p *principal) error

// handle registers f behind the console's one gate: cross-origin check and
// body bound on state changes, authentication, role, then the session's
// CSRF token on state changes.
func (h *Handler) handle(pattern string, need access, f handlerFunc) {
	h.patterns = append(h.patterns, pattern+" "+[...]string{"public", "viewer", "admin"}[need])
	h.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		api := strings.HasPrefix(r.URL.Path, "/api/")
		if unsafeMethod(r.Method) {
			r.Body = http.MaxBytesReader(w, r.Body, maxBody)
			if err := h.cop.Check(r); err != nil {
				h.fail(w, r, refuse(ReasonCrossOrigin, http.StatusForbidden, "cross-origin request refused"))
				return
			}
			if isForm(r) {
				// Parsed here so that an oversized or malformed form is
				// refused as such, not later as a form without its token.
				if err := parseForm(r); err != nil {
					h.fail(w, r, err)
					return
				}
			}
		}
		p, err := h.authenticate(r)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		if need > public {
			if p == nil {
				if !api && r.Method == http.MethodGet {
					to := "/login"
					if !h.adminExists() {
						to = "/setup"
					}
					h.refused(ReasonUnauthenticated)
					http.Redirect(w, r, to, http.StatusSeeOther)
					return
				}
				h.fail(w, r, errf(http.StatusUnauthorized, "log in first, or send Authorization: Bearer <API token>"))
				return
			}
			if need == admin && p.role != RoleAdmin {
				h.fail(w, r, refuse(ReasonForbiddenRole, http.StatusForbidden, "your role (%s) may look but not change anything; ask an admin", p.role))
				return
			}
			if unsafeMethod(r.Method) {
				if err := checkCSRF(r, p); err != nil {
					// Spaced and clipped: a signed-in viewer can send as
					// many as it likes, each path up to the request line's
					// ~36 KB, and the audit log bounds its count, not its
					// size.
					h.refusalAudit(r.Context(), p.actor(), "console.csrf_refused", ratelog.Clip(r.URL.Path, maxAuditPath), "")
					h.fail(w, r, err)
					return
				}
			}
		}
		if err := f(w, r, p); err != nil {
			h.fail(w, r, err)
		}
	})
}

// checkExportFetch refuses an export a browser fetched for another site,
// or for another host of the console's site: the export is a GET with
// effects (an audit event, up to 4 MiB of queued telemetry and 100 pages
// of the audit log loaded), and a same-site page (another host on the
// console's registrable domain) sends the SameSite=Strict session cookie
// with a GET it triggers. Allowed: no Sec-Fetch-Site (not a browser, or
// one too old to send it), same-origin (the device page's link) and none
// (the address typed or bookmarked).
func checkExportFetch(r *http.Request) error {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
		return nil
	}
	return refuse(ReasonCrossOrigin, http.StatusForbidden, "export refused: it was requested by another site; open it from the console's device page")
}

// done finishes a form: a message for the next page, then see-other.
func (h *Handler) done(w http.ResponseWriter, r *http.Request, p *principal, to, msg string) error {
	h.setFlash(p, msg)
	http.Redirect(w, r, to, http.StatusSeeOther)
	return nil
}

func (h *Handler) routes() {
	// Before login.
	h.handle("GET /setup", public, h.pageSetup)
	h.handle("POST /setup", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		if err := checkPreCSRF(r); err != nil {
			return err
		}
		in := setupInput{Code: r.PostFormValue("code"), User: r.PostFormValue("user"), Password: r.PostFormValue("password")}
		if r.PostFormValue("password2") != in.Password {
			return errf(http.StatusBadRequest, "the two passwords differ")
		}
		if _, err := h.doSetup(r.Context(), w, r, in); err != nil {
			return err
		}
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return nil
	})
	h.handle("GET /login", public, h.pageLogin)
	h.handle("POST /login", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		if err := checkPreCSRF(r); err != nil {
			return err
		}
		if _, err := h.doLogin(r.Context(), w, r, loginInput{User: r.PostFormValue("user"), Password: r.PostFormValue("password")}); err != nil {
			return err
		}
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return nil
	})
	h.handle("GET /recover", public, h.pageRecover)
	h.handle("POST /recover", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		if err := checkPreCSRF(r); err != nil {
			return err
		}
		in := setupInput{Code: r.PostFormValue("code"), User: r.PostFormValue("user"), Password: r.PostFormValue("password")}
		if r.PostFormValue("password2") != in.Password {
			return errf(http.StatusBadRequest, "the two passwords differ")
		}
		if err := h.doRecover(r.Context(), r, in); err != nil {
			return err
		}
		http.Redirect(w, r, "/login?recovered=1", http.StatusSeeOther)
		return nil
	})
	h.handle("POST /logout", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.doLogout(r.Context(), w, p); err != nil {
			return err
		}
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return nil
	})

	// Pages.
	h.handle("GET /{$}", viewer, h.pageDashboard)
	h.handle("GET /devices", viewer, h.pageDevices)
	h.handle("GET /devices/{id}", viewer, h.pageDevice)
	h.handle("GET /pairing", viewer, h.pagePairing)
	h.handle("GET /firmware", viewer, h.pageReport("firmware", "Firmware"))
	h.handle("GET /firewall", viewer, h.pageReport("firewall", "Firewall"))
	h.handle("GET /upstream", viewer, h.pageUpstream)
	h.handle("GET /privacy", viewer, h.pagePrivacy)
	h.handle("GET /admins", viewer, h.pageAdmins)
	h.handle("GET /audit", viewer, h.pageAudit)

	// Forms: the same actions as the API.
	h.handle("POST /devices", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		in := DeviceRequest{Name: r.PostFormValue("name"), Auth: r.PostFormValue("auth"), CSR: r.PostFormValue("csr"),
			Vendor: r.PostFormValue("vendor"), Model: r.PostFormValue("model")}
		c, err := h.addDevice(r.Context(), p, in)
		if err != nil {
			return err
		}
		// Shown once, in this answer only (Cache-Control: no-store).
		return h.render(w, r, p, http.StatusCreated, "credentials", "Credentials for "+c.Name, "devices", c)
	})
	h.handle("POST /devices/{id}/rename", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		id := r.PathValue("id")
		if _, err := h.renameDevice(r.Context(), p, id, renameInput{Name: r.PostFormValue("name")}); err != nil {
			return err
		}
		return h.done(w, r, p, "/devices/"+id, "Device renamed.")
	})
	h.handle("POST /devices/{id}/revoke", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		id := r.PathValue("id")
		if err := h.revokeDevice(r.Context(), p, id); err != nil {
			return err
		}
		return h.done(w, r, p, "/devices/"+id, "Device revoked: its credentials no longer work.")
	})
	h.handle("POST /devices/{id}/erase", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		id := r.PathValue("id")
		if err := h.eraseDevice(r.Context(), p, id); err != nil {
			return err
		}
		return h.done(w, r, p, "/devices/"+id, "Device revoked and its data deleted.")
	})
	h.handle("POST /pairing/expected", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		e, err := h.expectDevice(r.Context(), p, expectInput{Name: r.PostFormValue("name"), Code: r.PostFormValue("code")})
		if err != nil {
			return err
		}
		return h.done(w, r, p, "/pairing", fmt.Sprintf("%q will be accepted in the next pairing window. Press the button on the box to open it.", e.Name))
	})
	h.handle("POST /pairing/expected/{id}/delete", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.unexpectDevice(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		return h.done(w, r, p, "/pairing", "Withdrawn.")
	})
	h.handle("POST /firmware/check", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.firmwareCheck(r.Context(), p); err != nil {
			return err
		}
		return h.done(w, r, p, "/firmware", "Checking the update repository now.")
	})
	h.handle("POST /upstream/rules", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		in := ruleInput{Topic: strings.TrimSpace(r.PostFormValue("topic")), Action: r.PostFormValue("action"), Fields: splitFields(r.PostFormValue("fields"))}
		rule, err := h.putRule(r.Context(), p, in)
		if err != nil {
			return err
		}
		return h.done(w, r, p, "/upstream", "Rule saved: "+rule.Topic+" → "+rule.Action+".")
	})
	h.handle("POST /upstream/rules/{id}/delete", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteRule(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		return h.done(w, r, p, "/upstream", "Rule deleted.")
	})
	h.handle("POST /privacy/optout", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		in := optOutInput{Datum: r.PostFormValue("datum"), OptOut: r.PostFormValue("opt_out") == "true"}
		if err := h.setOptOut(r.Context(), p, in); err != nil {
			return err
		}
		return h.done(w, r, p, "/privacy", "Saved.")
	})
	h.handle("POST /admins", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		in := adminInput{Name: r.PostFormValue("name"), Role: r.PostFormValue("role"), Password: r.PostFormValue("password")}
		if _, err := h.addAdmin(r.Context(), p, in); err != nil {
			return err
		}
		return h.done(w, r, p, "/admins", "Account created.")
	})
	h.handle("POST /admins/{name}/role", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.setRole(r.Context(), p, r.PathValue("name"), roleInput{Role: r.PostFormValue("role")}); err != nil {
			return err
		}
		return h.done(w, r, p, "/admins", "Role changed.")
	})
	h.handle("POST /admins/{name}/delete", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteAdmin(r.Context(), p, r.PathValue("name")); err != nil {
			return err
		}
		return h.done(w, r, p, "/admins", "Account deleted.")
	})
	h.handle("POST /account/password", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if r.PostFormValue("new") != r.PostFormValue("new2") {
			return errf(http.StatusBadRequest, "the two new passwords differ")
		}
		if err := h.changePassword(r.Context(), p, passwordInput{Current: r.PostFormValue("current"), New: r.PostFormValue("new")}); err != nil {
			return err
		}
		return h.done(w, r, p, "/admins", "Password changed; your other sessions have ended and your API tokens were deleted.")
	})
	h.handle("POST /tokens", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		t, err := h.createToken(r.Context(), p, tokenInput{Label: r.PostFormValue("label")})
		if err != nil {
			return err
		}
		return h.render(w, r, p, http.StatusCreated, "token", "New API token", "admins", t)
	})
	h.handle("POST /tokens/{id}/delete", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteToken(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		return h.done(w, r, p, "/admins", "Token deleted.")
	})

	h.apiRoutes()
}

func (h *Handler) apiRoutes() {
	js := func(w http.ResponseWriter, code int, v any) error { writeJSON(w, code, v); return nil }
	sessionOut := func(s store.Session, p *principal) map[string]any {
		return map[string]any{"user": s.User, "csrf_token": s.CSRF, "expires_idle": h.o.IdleTimeout.String(),
			"expires_at": s.Created.Add(h.o.MaxAge)}
	}

	h.handle("POST /api/v1/setup", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		var in setupInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		s, err := h.doSetup(r.Context(), w, r, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, sessionOut(s, nil))
	})
	h.handle("POST /api/v1/recover", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		var in setupInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		if err := h.doRecover(r.Context(), r, in); err != nil {
			return err
		}
		return js(w, http.StatusOK, map[string]string{"result": "password set; log in"})
	})
	h.handle("POST /api/v1/session", public, func(w http.ResponseWriter, r *http.Request, _ *principal) error {
		var in loginInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		s, err := h.doLogin(r.Context(), w, r, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, sessionOut(s, nil))
	})
	h.handle("GET /api/v1/session", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		out := map[string]any{"user": p.user, "role": p.role}
		if p.session != nil {
			out["csrf_token"] = p.session.CSRF
		}
		return js(w, http.StatusOK, out)
	})
	h.handle("DELETE /api/v1/session", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.doLogout(r.Context(), w, p); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})

	h.handle("GET /api/v1/status", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		return js(w, http.StatusOK, h.dashboard(r.Context()))
	})
	h.handle("GET /api/v1/devices", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		ds, err := h.listDevices(r.Context(), r.URL.Query().Get("q"))
		if err != nil {
			return err
		}
		if ds == nil {
			ds = []store.Device{}
		}
		return js(w, http.StatusOK, ds)
	})
	h.handle("POST /api/v1/devices", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in DeviceRequest
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		c, err := h.addDevice(r.Context(), p, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, c)
	})
	h.handle("GET /api/v1/devices/{id}", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		d, err := h.getDevice(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, d)
	})
	h.handle("PATCH /api/v1/devices/{id}", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in renameInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		d, err := h.renameDevice(r.Context(), p, r.PathValue("id"), in)
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, d)
	})
	h.handle("POST /api/v1/devices/{id}/revoke", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.revokeDevice(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		d, err := h.getDevice(r.Context(), r.PathValue("id"))
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, d)
	})
	h.handle("GET /api/v1/devices/{id}/export", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := checkExportFetch(r); err != nil {
			return err
		}
		ex, err := h.exportDevice(r.Context(), p, r.PathValue("id"))
		if err != nil {
			return err
		}
		w.Header().Set("Content-Disposition", `attachment; filename="device-`+safeFilename(r.PathValue("id"))+`.json"`)
		return js(w, http.StatusOK, ex)
	})
	h.handle("DELETE /api/v1/devices/{id}/data", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.eraseDevice(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})

	h.handle("GET /api/v1/pairing", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		return js(w, http.StatusOK, h.pairing(r.Context()))
	})
	h.handle("POST /api/v1/pairing/expected", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in expectInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		e, err := h.expectDevice(r.Context(), p, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, e)
	})
	h.handle("DELETE /api/v1/pairing/expected/{id}", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.unexpectDevice(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})

	report := func(name string) handlerFunc {
		return func(w http.ResponseWriter, r *http.Request, p *principal) error {
			rep, ok, err := h.report(r.Context(), name)
			if !ok {
				return errNotAvailable
			}
			if err != nil {
				return err
			}
			return js(w, http.StatusOK, rep)
		}
	}
	h.handle("GET /api/v1/firmware", viewer, report("firmware"))
	h.handle("POST /api/v1/firmware/check", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.firmwareCheck(r.Context(), p); err != nil {
			return err
		}
		return js(w, http.StatusAccepted, map[string]string{"result": "check started"})
	})
	h.handle("GET /api/v1/firewall", viewer, report("firewall"))
	h.handle("GET /api/v1/upstream", viewer, report("upstream"))
	h.handle("GET /api/v1/upstream/rules", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		rs, err := h.o.Store.ForwardRules()
		if bad := (*store.UnreadableRulesError)(nil); errors.As(err, &bad) {
			return errf(http.StatusInternalServerError, "%v", bad) // names the records to delete
		}
		if err != nil {
			return err
		}
		if rs == nil {
			rs = []store.ForwardRule{}
		}
		return js(w, http.StatusOK, rs)
	})
	h.handle("POST /api/v1/upstream/rules", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in ruleInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		rule, err := h.putRule(r.Context(), p, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, rule)
	})
	h.handle("DELETE /api/v1/upstream/rules/{id}", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteRule(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})

	h.handle("GET /api/v1/privacy", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		ds, err := h.privacy()
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, ds)
	})
	h.handle("PUT /api/v1/privacy/optout", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in optOutInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		if err := h.setOptOut(r.Context(), p, in); err != nil {
			return err
		}
		ds, err := h.privacy()
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, ds)
	})

	h.handle("GET /api/v1/admins", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		us, err := h.listAdmins()
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, us)
	})
	h.handle("POST /api/v1/admins", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in adminInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		u, err := h.addAdmin(r.Context(), p, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, u)
	})
	h.handle("PUT /api/v1/admins/{name}/role", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in roleInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		if err := h.setRole(r.Context(), p, r.PathValue("name"), in); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	h.handle("DELETE /api/v1/admins/{name}", admin, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteAdmin(r.Context(), p, r.PathValue("name")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	h.handle("PUT /api/v1/account/password", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in passwordInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		if err := h.changePassword(r.Context(), p, in); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	h.handle("GET /api/v1/tokens", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		ts, err := h.listTokens(p)
		if err != nil {
			return err
		}
		return js(w, http.StatusOK, ts)
	})
	h.handle("POST /api/v1/tokens", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		var in tokenInput
		if err := decodeJSON(r, &in); err != nil {
			return err
		}
		t, err := h.createToken(r.Context(), p, in)
		if err != nil {
			return err
		}
		return js(w, http.StatusCreated, t)
	})
	h.handle("DELETE /api/v1/tokens/{id}", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		if err := h.deleteToken(r.Context(), p, r.PathValue("id")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
	h.handle("GET /api/v1/audit", viewer, func(w http.ResponseWriter, r *http.Request, p *principal) error {
		limit, before, err := parsePage(r.URL.Query().Get("limit"), r.URL.Query().Get("before"))
		if err != nil {
			return err
		}
		es, err := h.o.Store.AuditLog(limit, before)
		if err != nil {
			return err
		}
		if es == nil {
			es = []store.Event{}
		}
		return js(w, http.StatusOK, es)
	})
	h.mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such API endpoint (see openapi.yaml)"})
	})
}

// parsePage reads the audit log's paging parameters: limit 1-500
// (default 100), before a sequence number (0: newest).
func parsePage(limitS, beforeS string) (int, uint64, error) {
	limit := 100
	if limitS != "" {
		n, err := strconv.Atoi(limitS)
		if err != nil || n < 1 || n > 500 {
			return 0, 0, errf(http.StatusBadRequest, "limit %q: a number from 1 to 500", limitS)
		}
		limit = n
	}
	var before uint64
	if beforeS != "" {
		n, err := strconv.ParseUint(beforeS, 10, 64)
		if err != nil {
			return 0, 0, errf(http.StatusBadRequest, "before %q: a sequence number from the audit log", beforeS)
		}
		before = n
	}
	return limit, before, nil
}

func safeFilename(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, s)
}

// report returns a component's report; ok is false when the component is
// not in this build.
func (h *Handler) report(ctx context.Context, name string) (Report, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	switch name {
	case "firmware":
		if h.c().Firmware != nil {
			r, err := h.c().Firmware.Show(ctx)
			return r, true, err
		}
	case "firewall":
		if h.c().Firewall != nil {
			r, err := h.c().Firewall.Show(ctx)
			return r, true, err
		}
	case "upstream":
		if h.c().Upstream != nil {
			r, err := h.c().Upstream.Show(ctx)
			return r, true, err
		}
	}
	return Report{}, false, nil
}

// pairingState is what the pairing page and API show.
type pairingState struct {
	Window    PairingWindow          `json:"window"`
	Expected  []store.ExpectedDevice `json:"expected"`
	History   []PairingEvent         `json:"history"`
	Available bool                   `json:"available"`
	Error     string                 `json:"error,omitempty"`
}

func (h *Handler) pairing(ctx context.Context) pairingState {
	st := pairingState{Expected: []store.ExpectedDevice{}, History: []PairingEvent{}}
	es, err := h.expectedDevices()
	if err != nil {
		st.Error = err.Error()
	}
	if es != nil {
		st.Expected = es
	}
	if h.c().Pairing == nil {
		return st
	}
	st.Available = true
	if st.Window, err = h.c().Pairing.Window(ctx); err != nil {
		st.Error = err.Error()
	}
	st.Window.Available = true
	if hs, err := h.c().Pairing.History(ctx, 50); err != nil {
		st.Error = err.Error()
	} else if hs != nil {
		st.History = hs
	}
	return st
}

// dashboardData is the dashboard and GET /api/v1/status.
type dashboardData struct {
	Health   Health       `json:"health"`
	Uplink   *Report      `json:"uplink,omitempty"`
	Expiring []CertStatus `json:"certificates_expiring"`
	Alarms   []string     `json:"alarms"`
	Pairing  pairingState `json:"pairing"`
	Setup    bool         `json:"-"`
}

func (h *Handler) dashboard(ctx context.Context) dashboardData {
	d := dashboardData{Health: h.o.Gateway.Health(ctx), Expiring: []CertStatus{}, Alarms: []string{}}
	if !d.Health.ClockSane {
		d.Alarms = append(d.Alarms, "The clock is not set: no certificate is accepted or issued until it is.")
	}
	soon := h.o.Now().Add(30 * 24 * time.Hour)
	for _, c := range h.o.Gateway.Certificates(ctx) {
		if !c.Revoked && c.NotAfter.Before(soon) {
			d.Expiring = append(d.Expiring, c)
			if c.NotAfter.Before(h.o.Now()) {
				d.Alarms = append(d.Alarms, "Certificate "+c.Name+" has expired.")
			}
		}
	}
	if rep, ok, err := h.report(ctx, "upstream"); ok {
		d.Uplink = &rep
		if err != nil {
			d.Alarms = append(d.Alarms, "Upstream: "+err.Error())
		}
	}
	for _, n := range []string{"firewall", "firmware"} {
		rep, ok, err := h.report(ctx, n)
		if !ok {
			continue
		}
		if err != nil {
			d.Alarms = append(d.Alarms, n+": "+err.Error())
		}
		for _, s := range rep.Sections {
			if s.Alarm != "" {
				d.Alarms = append(d.Alarms, n+": "+s.Alarm)
			}
		}
	}
	if d.Uplink != nil {
		for _, s := range d.Uplink.Sections {
			if s.Alarm != "" {
				d.Alarms = append(d.Alarms, "upstream: "+s.Alarm)
			}
		}
	}
	d.Pairing = h.pairing(ctx)
	return d
}

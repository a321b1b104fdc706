package console

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
)

//go:embed templates
var templateFS embed.FS

var pageNames = []string{"error", "setup", "login", "recover", "dashboard", "devices", "device", "credentials",
	"pairing", "report", "upstream", "privacy", "admins", "token", "audit"}

type pages struct{ t map[string]*template.Template }

var funcs = template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.UTC().Format("2006-01-02 15:04 UTC")
	},
	"days": func(t time.Time) string {
		d := time.Until(t)
		if d < 0 {
			return "expired"
		}
		return fmt.Sprintf("%d days", int(d.Hours()/24))
	},
}

func loadPages() (*pages, error) {
	p := &pages{t: map[string]*template.Template{}}
	for _, n := range pageNames {
		t, err := template.New(n).Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+n+".html")
		if err != nil {
			return nil, fmt.Errorf("console: template %s: %w", n, err)
		}
		p.t[n] = t
	}
	return p, nil
}

// view is what every page template gets.
type view struct {
	Title   string
	Nav     string
	User    string
	Role    string
	IsAdmin bool
	CSRF    string // the session's token, or the pre-login form token
	Flash   string
	Error   string
	Data    any
}

// render executes into a buffer first so a template error never leaves a
// half-written page.
func (p *pages) render(w http.ResponseWriter, code int, name string, v *view) {
	var b bytes.Buffer
	if err := p.t[name].ExecuteTemplate(&b, "layout", v); err != nil {
		http.Error(w, "template error: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	w.Write(b.Bytes())
}

func (h *Handler) render(w http.ResponseWriter, r *http.Request, p *principal, code int, name, title, nav string, data any) error {
	v := &view{Title: title, Nav: nav, Data: data}
	if p != nil {
		v.User, v.Role, v.IsAdmin = p.user, p.role, p.role == RoleAdmin
		if p.session != nil {
			v.CSRF = p.session.CSRF
		}
		v.Flash = h.takeFlash(p)
	}
	h.pages.render(w, code, name, v)
	return nil
}

func (h *Handler) preRender(w http.ResponseWriter, r *http.Request, name, title string, data any) error {
	v := &view{Title: title, CSRF: preToken(w, r), Data: data}
	h.pages.render(w, http.StatusOK, name, v)
	return nil
}

func (h *Handler) pageSetup(w http.ResponseWriter, r *http.Request, p *principal) error {
	if h.adminExists() {
		http.Redirect(w, r, "/login", http.StatusSeeOther)
		return nil
	}
	return h.preRender(w, r, "setup", "Create the first admin", map[string]any{"Min": MinPasswordLen})
}

func (h *Handler) pageLogin(w http.ResponseWriter, r *http.Request, p *principal) error {
	if !h.adminExists() {
		http.Redirect(w, r, "/setup", http.StatusSeeOther)
		return nil
	}
	if p != nil {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return nil
	}
	return h.preRender(w, r, "login", "Log in", map[string]any{"Recovered": r.URL.Query().Get("recovered") == "1"})
}

func (h *Handler) pageRecover(w http.ResponseWriter, r *http.Request, p *principal) error {
	return h.preRender(w, r, "recover", "Password recovery", map[string]any{"Min": MinPasswordLen})
}

func (h *Handler) pageDashboard(w http.ResponseWriter, r *http.Request, p *principal) error {
	return h.render(w, r, p, http.StatusOK, "dashboard", "Dashboard", "dashboard", h.dashboard(r.Context()))
}

func (h *Handler) pageDevices(w http.ResponseWriter, r *http.Request, p *principal) error {
	q := r.URL.Query().Get("q")
	ds, err := h.listDevices(r.Context(), q)
	if err != nil {
		return err
	}
	return h.render(w, r, p, http.StatusOK, "devices", "Devices", "devices", map[string]any{"Q": q, "Devices": ds})
}

func (h *Handler) pageDevice(w http.ResponseWriter, r *http.Request, p *principal) error {
	d, err := h.getDevice(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	return h.render(w, r, p, http.StatusOK, "device", "Device "+d.Name, "devices", map[string]any{"D": d, "Traffic": h.c().Traffic != nil})
}

func (h *Handler) pagePairing(w http.ResponseWriter, r *http.Request, p *principal) error {
	return h.render(w, r, p, http.StatusOK, "pairing", "Pairing", "pairing", h.pairing(r.Context()))
}

func (h *Handler) pageReport(name, title string) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request, p *principal) error {
		rep, ok, err := h.report(r.Context(), name)
		data := map[string]any{"Name": name, "Available": ok, "Report": rep, "Err": ""}
		if err != nil {
			data["Err"] = err.Error()
		}
		return h.render(w, r, p, http.StatusOK, "report", title, name, data)
	}
}

func (h *Handler) pageUpstream(w http.ResponseWriter, r *http.Request, p *principal) error {
	rep, ok, err := h.report(r.Context(), "upstream")
	rules, rerr := h.o.Store.ForwardRules()
	// Records that do not decode are listed by id, with the rules that do,
	// so that they can be deleted here: failing the page instead hid both.
	var bad *store.UnreadableRulesError
	if rerr != nil && !errors.As(rerr, &bad) {
		return rerr
	}
	data := map[string]any{"Available": ok, "Report": rep, "Err": "", "Rules": rules, "RulesErr": "", "BadRules": []string(nil)}
	if err != nil {
		data["Err"] = err.Error()
	}
	if bad != nil {
		data["RulesErr"], data["BadRules"] = bad.Error(), bad.IDs
	}
	return h.render(w, r, p, http.StatusOK, "upstream", "Upstream", "upstream", data)
}

func (h *Handler) pagePrivacy(w http.ResponseWriter, r *http.Request, p *principal) error {
	ds, err := h.privacy()
	if err != nil {
		return err
	}
	return h.render(w, r, p, http.StatusOK, "privacy", "Privacy", "privacy", ds)
}

func (h *Handler) pageAdmins(w http.ResponseWriter, r *http.Request, p *principal) error {
	us, err := h.listAdmins()
	if err != nil {
		return err
	}
	ts, err := h.listTokens(p)
	if err != nil {
		return err
	}
	return h.render(w, r, p, http.StatusOK, "admins", "Accounts", "admins", map[string]any{"Users": us, "Tokens": ts, "Min": MinPasswordLen})
}

func (h *Handler) pageAudit(w http.ResponseWriter, r *http.Request, p *principal) error {
	limit, before, err := parsePage(r.URL.Query().Get("limit"), r.URL.Query().Get("before"))
	if err != nil {
		return err
	}
	// One event more than shown says whether there is an older page: the
	// store keeps only the newest events, so the oldest is seldom seq 1.
	es, err := h.o.Store.AuditLog(limit+1, before)
	if err != nil {
		return err
	}
	var next uint64
	if len(es) > limit {
		es = es[:limit]
		next = es[limit-1].Seq
	}
	return h.render(w, r, p, http.StatusOK, "audit", "Audit log", "audit", map[string]any{"Events": es, "Next": next})
}

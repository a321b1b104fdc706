package console

import (
	"encoding/json"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/gateway/store"
)

// Every refusal path counts its own reason in
// bastion_console_refusals_total, exactly once, and nothing else; a server
// error is not a refusal.
func TestEveryRefusalIsCountedByReason(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	reg := prometheus.NewRegistry()
	h, err := NewHandler(Options{Store: st, Gateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}, Now: clk.now, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(SecurityHeaders(h))
	defer srv.Close()

	// Every reason is exported from the start, at 0.
	if n := testutil.CollectAndCount(reg, "bastion_console_refusals_total"); n != len(RefusalReasons) {
		t.Fatalf("bastion_console_refusals_total has %d series, want %d", n, len(RefusalReasons))
	}
	counts := func() map[string]float64 {
		m := map[string]float64{}
		for _, r := range RefusalReasons {
			m[r] = testutil.ToFloat64(h.refusals.WithLabelValues(r))
		}
		return m
	}

	// Two clients on the test server's TLS transport: one never has a
	// session, the other keeps the admin's session cookie.
	noRedirect := func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	anon := &http.Client{Transport: srv.Client().Transport, CheckRedirect: noRedirect}
	jar, _ := cookiejar.New(nil)
	sess := &http.Client{Transport: srv.Client().Transport, CheckRedirect: noRedirect, Jar: jar}
	var csrfToken string
	viewerTok := "viewer-token-0123456789abcdef"

	type req struct {
		method, path, ctype, body string
		hdr                       map[string]string
	}
	do := func(t *testing.T, c *http.Client, q req) int {
		t.Helper()
		r, _ := http.NewRequest(q.method, srv.URL+q.path, strings.NewReader(q.body))
		if q.ctype == "" {
			q.ctype = "application/json"
		}
		r.Header.Set("Content-Type", q.ctype)
		for k, v := range q.hdr {
			r.Header.Set(k, v)
		}
		res, err := c.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	setup := `{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":"correct horse battery staple"}`
	big := `{"name":"` + strings.Repeat("a", 70<<10) + `","auth":"psk"}`

	steps := []struct {
		name   string
		run    func(t *testing.T) int
		status int
		reason string // "" = not a refusal: nothing counted
	}{
		{"not on the LAN", func(t *testing.T) int {
			r := httptest.NewRequest("GET", "/api/v1/status", nil)
			r.RemoteAddr = "8.8.8.8:4000"
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			return w.Code
		}, 403, ReasonNotLAN},
		{"wrong setup code", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/api/v1/setup", body: `{"code":"AAAA-BBBB-CCCC-DDDD","user":"root","password":"correct horse battery staple"}`})
		}, 403, ReasonBadCode},
		{"weak password at setup", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/api/v1/setup", body: `{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":"password123"}`})
		}, 400, ReasonWeakPassword},
		{"setup (accepted)", func(t *testing.T) int {
			res, err := sess.Post(srv.URL+"/api/v1/setup", "application/json", strings.NewReader(setup))
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			var out struct {
				CSRF string `json:"csrf_token"`
			}
			if err := json.NewDecoder(res.Body).Decode(&out); err != nil || out.CSRF == "" {
				t.Fatalf("setup answer: %v, csrf %q", err, out.CSRF)
			}
			csrfToken = out.CSRF
			st.PutAPIToken(store.APIToken{Hash: hashToken(viewerTok), ID: "v1", User: "watcher"})
			st.AddAdmin(store.AdminUser{Name: "watcher", Role: RoleViewer, Created: clk.now()})
			return res.StatusCode
		}, 201, ""},
		{"second setup", func(t *testing.T) int { return do(t, anon, req{method: "POST", path: "/api/v1/setup", body: setup}) }, 409, ReasonConflict},
		{"API without auth", func(t *testing.T) int { return do(t, anon, req{method: "GET", path: "/api/v1/devices"}) }, 401, ReasonUnauthenticated},
		{"unknown API token", func(t *testing.T) int {
			return do(t, anon, req{method: "GET", path: "/api/v1/devices", hdr: map[string]string{"Authorization": "Bearer not-a-real-token-at-all"}})
		}, 401, ReasonUnauthenticated},
		{"page without a session", func(t *testing.T) int { return do(t, anon, req{method: "GET", path: "/devices"}) }, 303, ReasonUnauthenticated},
		{"viewer asks for an admin action", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/api/v1/devices", body: `{"name":"x","auth":"psk"}`, hdr: map[string]string{"Authorization": "Bearer " + viewerTok}})
		}, 403, ReasonForbiddenRole},
		{"state change without the CSRF token", func(t *testing.T) int {
			return do(t, sess, req{method: "POST", path: "/api/v1/devices", body: `{"name":"x","auth":"psk"}`})
		}, 403, ReasonCSRF},
		{"login form without its form token", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/login", ctype: "application/x-www-form-urlencoded", body: "user=root&password=x"})
		}, 403, ReasonCSRF},
		{"cross-origin state change", func(t *testing.T) int {
			return do(t, sess, req{method: "POST", path: "/api/v1/devices", body: `{"name":"x","auth":"psk"}`,
				hdr: map[string]string{"X-CSRF-Token": csrfToken, "Sec-Fetch-Site": "cross-site"}})
		}, 403, ReasonCrossOrigin},
		{"unknown JSON field", func(t *testing.T) int {
			return do(t, sess, req{method: "POST", path: "/api/v1/devices", body: `{"name":"x","auth":"psk","admin":true}`, hdr: map[string]string{"X-CSRF-Token": csrfToken}})
		}, 400, ReasonInvalid},
		{"oversized JSON body", func(t *testing.T) int {
			return do(t, sess, req{method: "POST", path: "/api/v1/devices", body: big, hdr: map[string]string{"X-CSRF-Token": csrfToken}})
		}, 400, ReasonTooLarge},
		{"oversized form", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/login", ctype: "application/x-www-form-urlencoded", body: "user=" + strings.Repeat("a", 70<<10)})
		}, 400, ReasonTooLarge},
		{"unknown device", func(t *testing.T) int {
			return do(t, sess, req{method: "GET", path: "/api/v1/devices/nope"})
		}, 404, ReasonNotFound},
		{"server error is not a refusal", func(t *testing.T) int {
			// The stub gateway cannot add devices: 501.
			return do(t, sess, req{method: "POST", path: "/api/v1/devices", body: `{"name":"x","auth":"psk"}`, hdr: map[string]string{"X-CSRF-Token": csrfToken}})
		}, 501, ""},
		{"wrong password", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/api/v1/session", body: `{"user":"root","password":"wrong wrong wrong"}`})
		}, 401, ReasonBadLogin},
		{"more wrong passwords, up to the lockout", func(t *testing.T) int {
			for range DefaultThrottle.FreeUser - 2 {
				do(t, anon, req{method: "POST", path: "/api/v1/session", body: `{"user":"root","password":"wrong wrong wrong"}`})
			}
			return do(t, anon, req{method: "POST", path: "/api/v1/session", body: `{"user":"root","password":"wrong wrong wrong"}`})
		}, 401, ""}, // checked below: FreeUser-1 more bad logins
		{"login while locked out", func(t *testing.T) int {
			return do(t, anon, req{method: "POST", path: "/api/v1/session", body: `{"user":"root","password":"correct horse battery staple"}`})
		}, 429, ReasonThrottled},
		{"session expired", func(t *testing.T) int {
			clk.add(31 * time.Minute)
			return do(t, sess, req{method: "GET", path: "/api/v1/session"})
		}, 401, ReasonUnauthenticated},
	}
	for _, s := range steps {
		before := counts()
		if got := s.run(t); got != s.status {
			t.Errorf("%s: status %d, want %d", s.name, got, s.status)
		}
		after := counts()
		delta := map[string]float64{}
		for r, v := range after {
			if d := v - before[r]; d != 0 {
				delta[r] = d
			}
		}
		want := map[string]float64{}
		switch {
		case s.reason != "":
			want[s.reason] = 1
		case s.name == "more wrong passwords, up to the lockout":
			want[ReasonBadLogin] = float64(DefaultThrottle.FreeUser - 1)
		}
		if d := cmp.Diff(want, delta); d != "" {
			t.Errorf("%s: refusals counted (-want +got):\n%s", s.name, d)
		}
	}
	// Every reason but the catch-all was reached by some step above.
	for r, v := range counts() {
		if v == 0 && r != ReasonOther {
			t.Errorf("reason %q never counted by this test", r)
		}
	}
}

// The export, a GET with effects, is refused to a browser fetching it for
// another site or another host of the console's site (Sec-Fetch-Site
// same-site or cross-site: a same-site page gets the SameSite=Strict
// cookie sent), and answered for the console's own link, an address
// typed, and clients that send no Sec-Fetch-Site. Only the answered ones
// are audited.
func TestExportRefusedToOtherSites(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	setUpAdmin(t, srv)
	if err := h.o.Store.AddDevice(store.Device{ID: "dev-a", Name: "a"}); err != nil {
		t.Fatal(err)
	}
	code, cookie, _ := loginSession(t, h, "10.0.0.7:4000", "root", oldPassword)
	if code != http.StatusCreated {
		t.Fatalf("login: %d", code)
	}
	for site, want := range map[string]int{
		"":            http.StatusOK,
		"same-origin": http.StatusOK,
		"none":        http.StatusOK,
		"same-site":   http.StatusForbidden,
		"cross-site":  http.StatusForbidden,
	} {
		r := httptest.NewRequest("GET", "/api/v1/devices/dev-a/export", nil)
		if site != "" {
			r.Header.Set("Sec-Fetch-Site", site)
		}
		r.AddCookie(cookie)
		r.RemoteAddr = "10.0.0.7:4000"
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != want {
			t.Errorf("export with Sec-Fetch-Site %q: %d %.200s, want %d", site, w.Code, w.Body, want)
		}
	}
	if es := auditedOf(t, h.o.Store, "privacy.export"); len(es) != 3 {
		t.Errorf("%d privacy.export events, want 3 (the refused ones audited an export)", len(es))
	}
}

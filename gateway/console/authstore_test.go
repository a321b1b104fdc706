package console

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/gateway/store"
)

func (s faultyStore) Session(hash string) (store.Session, error) {
	if err := s.err("Session"); err != nil {
		return store.Session{}, err
	}
	return s.Store.Session(hash)
}

func (s faultyStore) APIToken(hash string) (store.APIToken, error) {
	if err := s.err("APIToken"); err != nil {
		return store.APIToken{}, err
	}
	return s.Store.APIToken(hash)
}

func (s faultyStore) Admin(name string) (store.AdminUser, error) {
	if err := s.err("Admin"); err != nil {
		return store.AdminUser{}, err
	}
	return s.Store.Admin(name)
}

// A store that fails to read the session, the API token or their account
// is answered 503, saying the login still stands, and ends nothing: once
// the store reads again, the same session and token work. A failed read
// of the session used to count as no session (the page sent to the
// login), and of the account as an account gone, which deleted the
// session: a passing store error logged the administrator out. A session
// whose account is not stored is still ended.
func TestAuthStoreErrorKeepsTheLogin(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	st := h.o.Store
	c, _ := setUpAdmin(t, srv)
	u, _ := url.Parse(srv.URL)
	var hash string
	for _, ck := range c.Jar.Cookies(u) {
		if ck.Name == sessionCookie {
			hash = hashToken(ck.Value)
		}
	}
	const tok = "auth-store-test-token-0123456789"
	if err := st.PutAPIToken(store.APIToken{Hash: hashToken(tok), ID: "t1", User: "root", Created: clk.now()}); err != nil {
		t.Fatal(err)
	}
	noRedirect := *c
	noRedirect.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	do := func(path string, bearer bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		hc := &noRedirect
		if bearer {
			req.Header.Set("Authorization", "Bearer "+tok)
			hc = srv.Client()
		}
		res, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	var logs syncBuffer
	h.log = slog.New(slog.NewTextHandler(&logs, nil))
	for _, tc := range []struct {
		fail   string
		bearer bool
		path   string
	}{
		{"Session", false, "/api/v1/session"},
		{"Session", false, "/"},
		{"Admin", false, "/api/v1/session"},
		{"Admin", false, "/"},
		{"APIToken", true, "/api/v1/session"},
		{"Admin", true, "/api/v1/session"},
	} {
		h.st = faultyStore{st, tc.fail}
		code, body := do(tc.path, tc.bearer)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "You are still logged in: try again in a moment.") || strings.Contains(body, errInjected.Error()) {
			t.Errorf("%s failing, GET %s (token %v): %d %.300s; want 503 saying the login stands, without the store's error", tc.fail, tc.path, tc.bearer, code, body)
		}
		h.st = st
		if code, body := do("/api/v1/session", tc.bearer); code != http.StatusOK {
			t.Errorf("after %s failed (token %v), with the store reading again: %d %s, want 200", tc.fail, tc.bearer, code, body)
		}
	}
	if _, err := st.Session(hash); err != nil {
		t.Errorf("the session after the failures: %v, want still stored", err)
	}
	if lines := linesWith(logs.String(), "cause="); len(lines) != 6 || !strings.Contains(lines[0], errInjected.Error()) {
		t.Errorf("log:\n%s\nwant 6 lines with the store's error as the cause", logs.String())
	}

	// An account that is not stored ends its session.
	const orphan = "orphan-session-id"
	if err := st.PutSession(store.Session{Hash: hashToken(orphan), User: "gone", CSRF: "x", Created: clk.now(), LastSeen: clk.now()}); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", srv.URL+"/api/v1/session", nil)
	req.AddCookie(&http.Cookie{Name: sessionCookie, Value: orphan})
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized {
		t.Errorf("session of an account not stored: %d, want 401", res.StatusCode)
	}
	if _, err := st.Session(hashToken(orphan)); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("session of an account not stored: %v, want deleted", err)
	}
}

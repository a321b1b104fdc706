package console

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/store"
)

var errInjected = errors.New("injected store failure")

// faultyStore is the store with one write made to fail: fail names it as
// "Method", or "SetMeta key" for one meta key.
type faultyStore struct {
	*store.Store
	fail string
}

func (s faultyStore) err(op string) error {
	if op == s.fail {
		return errInjected
	}
	return nil
}

func (s faultyStore) DeleteSession(hash string) error {
	if err := s.err("DeleteSession"); err != nil {
		return err
	}
	return s.Store.DeleteSession(hash)
}

func (s faultyStore) DeleteSessions(user string, expired func(store.Session) bool) error {
	if err := s.err("DeleteSessions"); err != nil {
		return err
	}
	return s.Store.DeleteSessions(user, expired)
}

func (s faultyStore) SetMeta(key string, v []byte) error {
	if err := s.err("SetMeta " + key); err != nil {
		return err
	}
	return s.Store.SetMeta(key, v)
}

func (s faultyStore) SetPasswordEndAccess(user, hash string, at time.Time, keep string) (int, error) {
	if err := s.err("SetPasswordEndAccess"); err != nil {
		return 0, err
	}
	return s.Store.SetPasswordEndAccess(user, hash, at, keep)
}

func (s faultyStore) RecoverAdmin(user, hash string, at time.Time) (int, error) {
	if err := s.err("RecoverAdmin"); err != nil {
		return 0, err
	}
	return s.Store.RecoverAdmin(user, hash, at)
}

// serveJSON sends a JSON request from a LAN address straight to h.
func serveJSON(h *Handler, method, path, body string, hdr ...string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.RemoteAddr = "10.0.0.5:4000"
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

const (
	oldPassword = "correct horse battery staple"
	newPassword = "another horse battery staple"
)

// A recovery on a box with no admin yet (its setup code stored) whose
// store write fails part way stops with an answer saying what state it
// left, and the state is a safe one: the account as it was, and no setup
// code left beside an account. The writes' errors used to be ignored (a
// setup code kept, recovery reported done), and setup was closed after
// the password was set.
func TestRecoveryStoreFailureLeavesNoSetupCodeBesideAnAccount(t *testing.T) {
	for _, tc := range []struct {
		fail            string
		codeKept, ended bool // setup code still stored; setup marked done
		want            string
	}{
		{"SetMeta " + MetaSetupCode, true, false, "deleting the first-admin setup code failed"},
		{"SetMeta " + MetaAdminExists, false, false, "the first-admin setup code is deleted, but marking setup as done failed"},
		{"RecoverAdmin", false, true, "setup is closed, but setting the password and ending the account's sessions and API tokens failed"},
	} {
		t.Run(tc.fail, func(t *testing.T) {
			h, _, _ := newTestHandler(t)
			st := h.o.Store
			if err := st.SetMeta(MetaSetupCode, []byte("sha256 of the code bastiond printed")); err != nil {
				t.Fatal(err)
			}
			code, err := h.NewRecoveryCode()
			if err != nil {
				t.Fatal(err)
			}
			h.st = faultyStore{st, tc.fail}
			w := serveJSON(h, "POST", "/api/v1/recover", fmt.Sprintf(`{"code":%q,"user":"root","password":%q}`, code, newPassword))
			if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), tc.want) ||
				!strings.Contains(w.Body.String(), "the account is unchanged and the recovery code is spent: get a new recovery code") ||
				!strings.Contains(w.Body.String(), errInjected.Error()) {
				t.Errorf("answer %d %s; want 500 saying %q, that the account is unchanged, and why", w.Code, w.Body, tc.want)
			}
			if _, err := st.Admin("root"); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("account root after the failed recovery: %v, want none", err)
			}
			if _, err := st.Meta(MetaSetupCode); (err == nil) != tc.codeKept {
				t.Errorf("setup code stored: %v, want %v", err == nil, tc.codeKept)
			}
			if _, err := st.Meta(MetaAdminExists); (err == nil) != tc.ended {
				t.Errorf("setup marked done: %v, want %v", err == nil, tc.ended)
			}
		})
	}
}

// accessOf is what works of root's: its session in c, and the API tokens
// stored.
func accessOf(t *testing.T, h *Handler, c *http.Client, srv *httptest.Server) (session, tokens int) {
	t.Helper()
	ts, err := h.o.Store.APITokens()
	if err != nil {
		t.Fatal(err)
	}
	return get(t, c, srv.URL+"/api/v1/session"), len(ts)
}

// loginClient is a client logged in as user, with a session of its own.
func loginClient(t *testing.T, srv *httptest.Server, user, password string) *http.Client {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	c := *srv.Client() // a copy: srv.Client() is one client, with one jar
	c.Jar = jar
	if code, body := post(t, &c, srv.URL+"/api/v1/session", fmt.Sprintf(`{"user":%q,"password":%q}`, user, password)); code != http.StatusCreated {
		t.Fatalf("login: %d %s", code, body)
	}
	return &c
}

// A recovery whose setting of the password, with the ending of the
// account's sessions and API tokens, fails changes neither, and says so:
// the old password, session and token still work, the new password does
// not. In two transactions, the password used to be set beside every old
// session and token.
func TestRecoveryFailureChangesNeitherPasswordNorAccess(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	c, csrfTok := setUpAdmin(t, srv)
	if code, body := post(t, c, srv.URL+"/api/v1/tokens", `{"label":"ci"}`, "X-CSRF-Token", csrfTok); code != http.StatusCreated {
		t.Fatalf("create token: %d %s", code, body)
	}
	code, err := h.NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	h.st = faultyStore{h.o.Store, "RecoverAdmin"}
	w := serveJSON(h, "POST", "/api/v1/recover", fmt.Sprintf(`{"code":%q,"user":"root","password":%q}`, code, newPassword))
	if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), `Recovery of \"root\" stopped: setup is closed, but setting the password and ending the account's sessions and API tokens failed (injected store failure); the account is unchanged`) {
		t.Errorf("answer %d %s; want 500 saying the account is unchanged", w.Code, w.Body)
	}
	if s, n := accessOf(t, h, c, srv); s != http.StatusOK || n != 1 {
		t.Errorf("after the failure: session %d, %d API tokens; want 200 and 1 (as the answer says)", s, n)
	}
	if got := login(h, "10.0.0.6:4000", "root", oldPassword); got != http.StatusCreated {
		t.Errorf("login with the old password: %d, want 201", got)
	}
	if got := login(h, "10.0.0.7:4000", "root", newPassword); got != http.StatusUnauthorized {
		t.Errorf("login with the new password: %d, want 401", got)
	}
	if es := auditedOf(t, h.o.Store, "console.recover"); len(es) != 0 {
		t.Errorf("console.recover events %v after a recovery that changed nothing, want none", es)
	}
}

// A password change whose write fails changes neither the password nor
// the other sessions and API tokens, and says so. It used to answer that
// the new password was set and none of them had ended.
func TestPasswordChangeFailureChangesNeitherPasswordNorAccess(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	c, csrfTok := setUpAdmin(t, srv)
	if code, body := post(t, c, srv.URL+"/api/v1/tokens", `{"label":"ci"}`, "X-CSRF-Token", csrfTok); code != http.StatusCreated {
		t.Fatalf("create token: %d %s", code, body)
	}
	other := loginClient(t, srv, "root", oldPassword)
	h.st = faultyStore{h.o.Store, "SetPasswordEndAccess"}
	req, _ := http.NewRequest("PUT", srv.URL+"/api/v1/account/password", strings.NewReader(fmt.Sprintf(`{"current":%q,"new":%q}`, oldPassword, newPassword)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-CSRF-Token", csrfTok)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	code, body := res.StatusCode, string(b)
	if code != http.StatusInternalServerError || !strings.Contains(body, `The password of \"root\" is unchanged: setting it and ending its other sessions and API tokens failed (injected store failure). The old password, and every session and API token, still work.`) {
		t.Errorf("answer %d %s; want 500 saying the password is unchanged and every session and token still works", code, body)
	}
	if s, n := accessOf(t, h, other, srv); s != http.StatusOK || n != 1 {
		t.Errorf("after the failure: the other session %d, %d API tokens; want 200 and 1 (as the answer says)", s, n)
	}
	if got := login(h, "10.0.0.6:4000", "root", oldPassword); got != http.StatusCreated {
		t.Errorf("login with the old password: %d, want 201", got)
	}
	if got := login(h, "10.0.0.7:4000", "root", newPassword); got != http.StatusUnauthorized {
		t.Errorf("login with the new password: %d, want 401", got)
	}
}

// syncBuffer is a bytes.Buffer safe for a logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A login whose deleting of the browser's previous session, or sweep of
// expired sessions, fails still logs in, and logs the failure with the
// user (both failures used to be dropped unseen).
func TestLoginLogsSessionCleanupFailures(t *testing.T) {
	for _, tc := range []struct{ fail, want string }{
		{"DeleteSession", "previous session could not be deleted"},
		{"DeleteSessions", "expired sessions could not be swept"},
	} {
		t.Run(tc.fail, func(t *testing.T) {
			h, srv, _ := newTestHandler(t)
			setUpAdmin(t, srv)
			var logs syncBuffer
			h.log = slog.New(slog.NewTextHandler(&logs, nil))
			h.st = faultyStore{h.o.Store, tc.fail}
			r := httptest.NewRequest("POST", "/api/v1/session", strings.NewReader(fmt.Sprintf(`{"user":"root","password":%q}`, oldPassword)))
			r.Header.Set("Content-Type", "application/json")
			r.RemoteAddr = "10.0.0.5:4000"
			r.AddCookie(&http.Cookie{Name: sessionCookie, Value: "an-earlier-session"})
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != http.StatusCreated {
				t.Fatalf("login: %d %s, want 201", w.Code, w.Body)
			}
			var line string
			for l := range strings.SplitSeq(logs.String(), "\n") {
				if strings.Contains(l, tc.want) {
					line = l
				}
			}
			if !strings.Contains(line, "level=WARN") || !strings.Contains(line, "user=root") || !strings.Contains(line, errInjected.Error()) {
				t.Errorf("log:\n%s\nwant a warning %q with user=root and the error", logs.String(), tc.want)
			}
		})
	}
}

func (s faultyStore) DeleteExpectedDevice(id string) error {
	if err := s.err("DeleteExpectedDevice"); err != nil {
		return err
	}
	return s.Store.DeleteExpectedDevice(id)
}

func (s faultyStore) OptOuts() (map[string]bool, error) {
	if err := s.err("OptOuts"); err != nil {
		return nil, err
	}
	return s.Store.OptOuts()
}

// linesWith returns the lines of logs that contain s.
func linesWith(logs, s string) []string {
	var out []string
	for l := range strings.SplitSeq(logs, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// An expired session whose deleting fails is refused all the same, at
// every use, and each failure is logged with its user (it used to be
// dropped unseen). Once the store works again, the next use deletes it.
func TestExpiredSessionNotDeletedStaysRefused(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	c, _ := setUpAdmin(t, srv)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var hash string
	for _, ck := range c.Jar.Cookies(u) {
		if ck.Name == sessionCookie {
			hash = hashToken(ck.Value)
		}
	}
	if _, err := h.o.Store.Session(hash); err != nil {
		t.Fatalf("the session set up: %v", err)
	}
	var logs syncBuffer
	h.log = slog.New(slog.NewTextHandler(&logs, nil))
	h.st = faultyStore{h.o.Store, "DeleteSession"}
	clk.add(31 * time.Minute)
	for i := range 2 {
		if code := get(t, c, srv.URL+"/api/v1/session"); code != http.StatusUnauthorized {
			t.Errorf("use %d of the expired session the store could not delete: %d, want 401", i+1, code)
		}
	}
	if _, err := h.o.Store.Session(hash); err != nil {
		t.Errorf("the session after its deleting failed: %v, want still stored", err)
	}
	lines := linesWith(logs.String(), "could not be deleted")
	if len(lines) != 2 {
		t.Fatalf("log:\n%s\nwant 2 lines saying the session could not be deleted", logs.String())
	}
	for _, l := range lines {
		if !strings.Contains(l, "level=WARN") || !strings.Contains(l, "why=expired") || !strings.Contains(l, "user=root") || !strings.Contains(l, errInjected.Error()) {
			t.Errorf("log line %q, want a warning with why=expired, user=root and the error", l)
		}
	}
	h.st = h.o.Store
	if code := get(t, c, srv.URL+"/api/v1/session"); code != http.StatusUnauthorized {
		t.Errorf("the expired session once the store works: %d, want 401", code)
	}
	if _, err := h.o.Store.Session(hash); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("the expired session once the store works: %v, want deleted", err)
	}
}

// An expired expected device whose deleting fails is not listed (nor
// used: pairing checks the expiry itself), and the failure is logged (it
// used to be dropped unseen); the next listing deletes it.
func TestExpiredExpectedDeviceNotDeletedIsLogged(t *testing.T) {
	h, _, clk := newTestHandler(t)
	now := clk.now()
	old, err := h.o.Store.ExpectDevice(store.ExpectedDevice{Name: "old", Code: "ABCD-EFGH", Created: now.Add(-25 * time.Hour), Expires: now.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	live, err := h.o.Store.ExpectDevice(store.ExpectedDevice{Name: "live", Code: "JKLM-NPQR", Created: now, Expires: now.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	h.log = slog.New(slog.NewTextHandler(&logs, nil))
	h.st = faultyStore{h.o.Store, "DeleteExpectedDevice"}
	es, err := h.expectedDevices()
	if err != nil || len(es) != 1 || es[0].ID != live.ID {
		t.Errorf("listed %+v, %v; want only %s", es, err, live.ID)
	}
	lines := linesWith(logs.String(), "expired expected device could not be deleted")
	if len(lines) != 1 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "expected="+old.ID) || !strings.Contains(lines[0], errInjected.Error()) {
		t.Errorf("log:\n%s\nwant one warning naming %s with the error", logs.String(), old.ID)
	}
	h.st = h.o.Store
	if es, err := h.expectedDevices(); err != nil || len(es) != 1 {
		t.Errorf("listed %+v, %v; want only %s", es, err, live.ID)
	}
	if all, err := h.o.Store.ExpectedDevices(); err != nil || len(all) != 1 || all[0].ID != live.ID {
		t.Errorf("stored %+v, %v once the store works; want only %s", all, err, live.ID)
	}
}

// An opt-out saved whose reading back, to hand it to the gateway, fails
// is answered as such: saved, not in force, what to do. It used to be
// answered as done, the gateway never told.
func TestOptOutNotReadBackSaysNotApplied(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	var mu sync.Mutex
	var told []map[string]bool
	h.SetComponents(Components{OptOutsChanged: func(m map[string]bool) { mu.Lock(); told = append(told, m); mu.Unlock() }})
	c, csrfTok := setUpAdmin(t, srv)
	optOut := func() (int, string) {
		req, _ := http.NewRequest("PUT", srv.URL+"/api/v1/privacy/optout", strings.NewReader(`{"datum":"device.counters","opt_out":true}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-CSRF-Token", csrfTok)
		res, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	h.st = faultyStore{h.o.Store, "OptOuts"}
	if code, body := optOut(); code != http.StatusInternalServerError || !strings.Contains(body, "The change is saved, but the running gateway has not applied it: reading the opt-outs back failed (injected store failure)") {
		t.Errorf("answer %d %s; want 500 saying the change is saved but not applied", code, body)
	}
	if m, err := h.o.Store.OptOuts(); err != nil || !m["device.counters"] {
		t.Errorf("stored opt-outs %v, %v; want device.counters saved, as the answer says", m, err)
	}
	mu.Lock()
	if len(told) != 0 {
		t.Errorf("the gateway was told %v, want nothing", told)
	}
	mu.Unlock()
	h.st = h.o.Store
	if code, body := optOut(); code != http.StatusOK {
		t.Fatalf("saving again: %d %s, want 200", code, body)
	}
	mu.Lock()
	defer mu.Unlock()
	if d := cmp.Diff([]map[string]bool{{"device.counters": true}}, told); d != "" {
		t.Errorf("the gateway told (-want +got):\n%s", d)
	}
}

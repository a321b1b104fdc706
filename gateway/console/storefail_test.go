package console

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

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

func (s faultyStore) AddAdmin(u store.AdminUser) error {
	if err := s.err("AddAdmin"); err != nil {
		return err
	}
	return s.Store.AddAdmin(u)
}

func (s faultyStore) UpdateAdmin(name string, fn func(*store.AdminUser) error) (store.AdminUser, error) {
	if err := s.err("UpdateAdmin"); err != nil {
		return store.AdminUser{}, err
	}
	return s.Store.UpdateAdmin(name, fn)
}

func (s faultyStore) SetMeta(key string, v []byte) error {
	if err := s.err("SetMeta " + key); err != nil {
		return err
	}
	return s.Store.SetMeta(key, v)
}

func (s faultyStore) EndAccess(user, keep string) (int, error) {
	if err := s.err("EndAccess"); err != nil {
		return 0, err
	}
	return s.Store.EndAccess(user, keep)
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
		{"AddAdmin", false, true, "setup is closed, but setting the password failed"},
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
			h.acct = faultyStore{st, tc.fail}
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

// When the recovery's last write (ending the account's sessions and API
// tokens) fails, the answer says exactly what holds: the new password is
// set, and every old session and token still works; the audit log records
// the password set.
func TestRecoveryEndAccessFailureSaysWhatIsLeft(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	c, csrfTok := setUpAdmin(t, srv)
	if code, body := post(t, c, srv.URL+"/api/v1/tokens", `{"label":"ci"}`, "X-CSRF-Token", csrfTok); code != http.StatusCreated {
		t.Fatalf("create token: %d %s", code, body)
	}
	code, err := h.NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	h.acct = faultyStore{h.o.Store, "EndAccess"}
	w := serveJSON(h, "POST", "/api/v1/recover", fmt.Sprintf(`{"code":%q,"user":"root","password":%q}`, code, newPassword))
	if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), `The password of \"root\" is set, but ending its sessions and API tokens failed (injected store failure): none of them has ended`) {
		t.Errorf("answer %d %s; want 500 saying the password is set and no session or token has ended", w.Code, w.Body)
	}
	if got := get(t, c, srv.URL+"/api/v1/session"); got != http.StatusOK {
		t.Errorf("the old session after the failure: %d, want 200 (as the answer says)", got)
	}
	if ts, _ := h.o.Store.APITokens(); len(ts) != 1 {
		t.Errorf("%d API tokens after the failure, want the 1 the answer says still works", len(ts))
	}
	if got := login(h, "10.0.0.6:4000", "root", newPassword); got != http.StatusCreated {
		t.Errorf("login with the new password: %d, want 201", got)
	}
	if es := auditedOf(t, h.o.Store, "console.recover"); len(es) != 1 || !strings.Contains(es[0].Detail, "none ended") {
		t.Errorf("console.recover events %v, want one saying none ended", es)
	}
}

// A password change whose ending of the other sessions and API tokens
// fails says so, and that the new password is set (it used to answer
// "internal error").
func TestPasswordChangeEndAccessFailureSaysWhatIsLeft(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	c, csrfTok := setUpAdmin(t, srv)
	h.acct = faultyStore{h.o.Store, "EndAccess"}
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
	if code != http.StatusInternalServerError || !strings.Contains(body, `The new password of \"root\" is set, but ending its other sessions and API tokens failed (injected store failure): none of them has ended`) {
		t.Errorf("answer %d %s; want 500 saying the password is set and no other session or token has ended", code, body)
	}
	if got := login(h, "10.0.0.6:4000", "root", newPassword); got != http.StatusCreated {
		t.Errorf("login with the new password: %d, want 201", got)
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
			h.acct = faultyStore{h.o.Store, tc.fail}
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

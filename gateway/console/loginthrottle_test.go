package console

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
)

// A successful login lifts its source address's lockout but keeps the
// failures counted against it: a host with one account of its own that
// fails against other accounts is locked out at the source's count as if
// it had never logged in. The success used to erase the source's count,
// so logging in between failures kept it from ever being locked out.
func TestLoginSuccessKeepsSourceFailures(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(ThrottlePolicy{FreeUser: 100, FreeSource: 4, Base: time.Minute, Max: time.Hour, Forget: time.Hour}, throttleKeys)
	const src = "10.0.0.7:4000"
	for i := range 3 {
		clk.add(time.Second)
		if code := login(h, src, fmt.Sprintf("user%d", i), "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d, want 401", i, code)
		}
	}
	if code := login(h, src, "root", oldPassword); code != http.StatusCreated {
		t.Fatalf("the source's own account: %d, want 201", code)
	}
	if code := login(h, src, "user3", "wrong wrong wrong"); code != http.StatusUnauthorized {
		t.Fatalf("fourth failure: %d, want 401", code)
	}
	if code := login(h, src, "root", oldPassword); code != http.StatusTooManyRequests {
		t.Errorf("right password after the source's 4th failure: %d, want 429 (the success before erased its failures)", code)
	}
}

// hookGateway is a Gateway with Argon2Slots whose slot taking runs hook
// (if set): what another request does while a password is checked.
type hookGateway struct {
	stubGateway
	hook func()
}

func (g *hookGateway) AcquireArgon2(context.Context) error {
	if g.hook != nil {
		g.hook()
	}
	return nil
}

func (g *hookGateway) ReleaseArgon2() {}

// A successful login lifts a lockout of its source address that another
// request's failure set while the password was being checked.
func TestLoginSuccessLiftsSourceLockout(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	gw := &hookGateway{stubGateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}}
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h, err := NewHandler(Options{Store: st, Gateway: gw, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	if w := serveJSON(h, "POST", "/api/v1/setup", fmt.Sprintf(`{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":%q}`, oldPassword)); w.Code != http.StatusCreated {
		t.Fatalf("setup: %d %s", w.Code, w.Body)
	}
	gw.hook = func() { h.thr.Fail(clk.now(), "s:10.0.0.5", 1) }
	if w := serveJSON(h, "POST", "/api/v1/session", fmt.Sprintf(`{"user":"root","password":%q}`, oldPassword)); w.Code != http.StatusCreated {
		t.Fatalf("login: %d %s", w.Code, w.Body)
	}
	if until := h.thr.LockedUntil(clk.now(), "s:10.0.0.5"); !until.IsZero() {
		t.Errorf("the source is locked until %s after its successful login, want no lockout", until)
	}
}

// loginSession logs in from remote straight to h and returns the status,
// the session cookie and its CSRF token.
func loginSession(t *testing.T, h *Handler, remote, user, password string) (int, *http.Cookie, string) {
	t.Helper()
	r := httptest.NewRequest("POST", "/api/v1/session", strings.NewReader(fmt.Sprintf(`{"user":%q,"password":%q}`, user, password)))
	r.Header.Set("Content-Type", "application/json")
	r.RemoteAddr = remote
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusCreated {
		return w.Code, nil, ""
	}
	var out struct {
		CSRF string `json:"csrf_token"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil {
		t.Fatalf("login answer %s: %v", w.Body, err)
	}
	for _, c := range w.Result().Cookies() {
		if c.Name == sessionCookie {
			return w.Code, c, out.CSRF
		}
	}
	t.Fatalf("login answered %d without a session cookie", w.Code)
	return 0, nil, ""
}

// One LAN host that locks an account out and keeps it locked (a failure
// an hour, each refused one extending the lockout) does not keep its
// owner out: a source with no failure has its password checked while the
// account is locked, the right one logs in and lifts the lockout, and a
// signed-in owner can change the password. The account's lockout used to
// refuse every source, the owner's right password too, and each refusal
// extended it. A source that has failed is still refused on the account's
// lockout, and the account's failures outlive the owner's login: the
// guesser's next failure locks it again.
func TestLockedOutUserLogsInFromACleanSource(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(DefaultThrottle, throttleKeys)
	const attacker, owner = "10.0.0.66:4000", "10.0.0.7:4000"
	// Guesses, each when the last lockout ends, until it is the longest.
	for i := 0; h.thr.LockedUntil(clk.now(), "u:root").Sub(clk.now()) < DefaultThrottle.Max; i++ {
		if i == 15 {
			t.Fatal("root not locked out for Max after 15 guesses")
		}
		if until := h.thr.LockedUntil(clk.now(), "u:root"); !until.IsZero() {
			clk.add(until.Sub(clk.now()))
		}
		if code := login(h, attacker, "root", "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("guess %d: %d, want 401", i, code)
		}
	}
	for i := range 3 { // an hour apart: each refused, each extends the lockout
		clk.add(time.Hour - time.Second)
		if code := login(h, attacker, "root", "wrong wrong wrong"); code != http.StatusTooManyRequests {
			t.Fatalf("hourly guess %d from the source that failed: %d, want 429", i, code)
		}
	}
	if code := login(h, attacker, "root", oldPassword); code != http.StatusTooManyRequests {
		t.Errorf("right password from the source that failed, root locked: %d, want 429", code)
	}
	if h.thr.LockedUntil(clk.now(), "u:root").IsZero() {
		t.Fatal("root is not locked out after the guesses")
	}
	// A clean source's wrong password is checked (401, not 429)...
	if code := login(h, "10.0.0.8:4000", "root", "wrong wrong wrong"); code != http.StatusUnauthorized {
		t.Errorf("wrong password from a clean source, root locked: %d, want 401", code)
	}
	// ...and then it has failed: refused, even with the right one.
	if code := login(h, "10.0.0.8:4000", "root", oldPassword); code != http.StatusTooManyRequests {
		t.Errorf("right password from a source with one failure, root locked: %d, want 429", code)
	}
	code, cookie, csrf := loginSession(t, h, owner, "root", oldPassword)
	if code != http.StatusCreated {
		t.Fatalf("the owner's right password from a clean source, root locked: %d, want 201", code)
	}
	if !h.thr.LockedUntil(clk.now(), "u:root").IsZero() {
		t.Error("root still locked out after the owner's login")
	}
	// The failures stay: the guesser's next one locks root again.
	if code := login(h, attacker, "root", "wrong wrong wrong"); code != http.StatusUnauthorized {
		t.Fatalf("guess after the owner's login: %d, want 401", code)
	}
	if h.thr.LockedUntil(clk.now(), "u:root").IsZero() {
		t.Error("root not locked out again by one failure after the owner's login: the login erased its failures")
	}
	// Locked again, the signed-in owner can still change the password.
	r := httptest.NewRequest("PUT", "/api/v1/account/password", strings.NewReader(fmt.Sprintf(`{"current":%q,"new":%q}`, oldPassword, newPassword)))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("X-CSRF-Token", csrf)
	r.AddCookie(cookie)
	r.RemoteAddr = owner
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusNoContent {
		t.Errorf("password change by the signed-in owner, root locked: %d %s, want 204", w.Code, w.Body)
	}
}

package console_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/console"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/gateway/store"
)

func TestFirstAdminNeedsTheSetupCodeAndOnlyOnce(t *testing.T) {
	b := startBox(t)
	c := b.client(t)
	// No default account: nothing logs in before setup.
	for _, pw := range []string{"admin", "password", "bastion", ""} {
		if r := b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": "admin", "password": pw}, nil); r.code != http.StatusUnauthorized {
			t.Errorf("login admin/%q before setup: %d %s, want 401", pw, r.code, r.body)
		}
	}
	// The dashboard sends a stranger to setup.
	if r := b.do(t, c, "GET", "/", nil, nil); r.code != http.StatusSeeOther || r.hdr.Get("Location") != "/setup" {
		t.Errorf("GET / before setup: %d to %q, want 303 to /setup", r.code, r.hdr.Get("Location"))
	}
	r := b.do(t, c, "POST", "/api/v1/setup", map[string]string{"code": "AAAA-BBBB-CCCC-DDDD", "user": "root", "password": goodPassword}, nil)
	if r.code != http.StatusForbidden {
		t.Fatalf("setup with a wrong code: %d %s, want 403", r.code, r.body)
	}
	r = b.do(t, c, "POST", "/api/v1/setup", map[string]string{"user": "root", "password": goodPassword}, nil)
	if r.code != http.StatusForbidden {
		t.Fatalf("setup without a code (no button press): %d %s, want 403", r.code, r.body)
	}
	b.setupAdmin(t, "root")
	// The code is spent: a second admin cannot be made with it.
	r = b.do(t, b.client(t), "POST", "/api/v1/setup", map[string]string{"code": b.code, "user": "mallory", "password": goodPassword}, nil)
	if r.code != http.StatusConflict {
		t.Errorf("second setup with the same code: %d %s, want 409", r.code, r.body)
	}
	if b.g.CheckSetupCode(b.code) {
		t.Error("setup code still valid after the first admin exists")
	}
	if _, err := b.g.Store().Meta(console.MetaAdminExists); err != nil {
		t.Errorf("meta %s not set: %v", console.MetaAdminExists, err)
	}
}

func TestWeakAndDefaultPasswordsRefused(t *testing.T) {
	b := startBox(t)
	c := b.client(t)
	for _, pw := range []string{"admin", "password", "short1!", "Password1234", "P@ssw0rd2024!", "qwertyuiop123",
		"123456789012", "aaaaaaaaaaaaaaaa", "abcabcabcabcabc", "root-is-my-name-x", "letmein!letmein!", "Bastion2026!!"} {
		r := b.do(t, c, "POST", "/api/v1/setup", map[string]string{"code": b.code, "user": "root", "password": pw}, nil)
		if r.code != http.StatusBadRequest || !strings.Contains(r.body, "password") {
			t.Errorf("setup with password %q: %d %s, want 400 naming the password", pw, r.code, r.body)
		}
	}
	// The code still works after all those refusals (they were not guesses).
	admin, tok := b.setupAdmin(t, "root")
	r := b.do(t, admin, "POST", "/api/v1/admins", map[string]string{"name": "ann", "role": "viewer", "password": "ann-ann-ann-123"}, csrf(tok))
	if r.code != http.StatusBadRequest {
		t.Errorf("account with a password containing its name: %d %s, want 400", r.code, r.body)
	}
	// Stored as argon2id with a per-user salt.
	u, err := b.g.Store().Admin("root")
	if err != nil || !regexp.MustCompile(`^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$`).MatchString(u.PasswordHash) {
		t.Errorf("stored hash %q (%v), want argon2id with a 16-byte salt", u.PasswordHash, err)
	}
}

func TestLoginBruteForceLocksOut(t *testing.T) {
	b := startBox(t)
	b.setupAdmin(t, "root")
	c := b.client(t)
	codes := map[int]int{}
	for i := range 8 {
		r := b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": "root", "password": "guess number " + string(rune('a'+i))}, nil)
		codes[r.code]++
	}
	if free := console.DefaultThrottle.FreeUser; codes[http.StatusUnauthorized] != free || codes[http.StatusTooManyRequests] != 8-free {
		t.Errorf("8 wrong passwords gave %v, want %d×401 then 429s", codes, free)
	}
	// Locked: even the right password is refused now, with Retry-After,
	// from the source that failed (one that has not is still checked:
	// TestLockedOutUserLogsInFromACleanSource).
	r := b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": "root", "password": goodPassword}, nil)
	if r.code != http.StatusTooManyRequests || r.hdr.Get("Retry-After") == "" {
		t.Errorf("right password while locked: %d (Retry-After %q) %s, want 429 with Retry-After", r.code, r.hdr.Get("Retry-After"), r.body)
	}
	es, _ := b.g.Store().AuditLog(100, 0)
	n := 0
	for _, e := range es {
		if e.Action == "console.login_failed" && e.Target == "root" && e.Remote == "127.0.0.1" {
			n++
		}
	}
	// The first failure, at once; the others within the minute are counted
	// into the kind's next event (TestFailedLoginsAuditedSpaced).
	if n != 1 {
		t.Errorf("audit log has %d console.login_failed for root from 127.0.0.1, want 1", n)
	}
}

func TestStateChangeWithoutCSRFTokenRefused(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	rule := map[string]any{"topic": "devices/+/t/temp", "action": "forward"}
	for name, hdr := range map[string]map[string]string{
		"no token":    nil,
		"wrong token": csrf(strings.Repeat("A", 43)),
		"cross-site":  {"X-CSRF-Token": tok, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
	} {
		if r := b.do(t, c, "POST", "/api/v1/upstream/rules", rule, hdr); r.code != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", name, r.code, r.body)
		}
	}
	// A form without the token is refused too.
	if r := b.do(t, c, "POST", "/upstream/rules", url.Values{"topic": {"devices/+/t/temp"}, "action": {"forward"}}, nil); r.code != http.StatusForbidden {
		t.Errorf("form without csrf: %d, want 403", r.code)
	}
	if rs, _ := b.g.Store().ForwardRules(); len(rs) != 0 {
		t.Fatalf("a refused request changed the rules: %v", rs)
	}
	if r := b.do(t, c, "POST", "/api/v1/upstream/rules", rule, csrf(tok)); r.code != http.StatusOK {
		t.Errorf("with the token: %d %s, want 200", r.code, r.body)
	}
	// Pre-login forms need their own token.
	if r := b.do(t, b.client(t), "POST", "/login", url.Values{"user": {"root"}, "password": {goodPassword}}, nil); r.code != http.StatusForbidden {
		t.Errorf("login form without its token: %d, want 403", r.code)
	}
}

func TestSessionCookieReplayedAfterLogoutFails(t *testing.T) {
	b := startBox(t)
	b.setupAdmin(t, "root")
	c, tok := b.login(t, "root", goodPassword)
	u, _ := http.NewRequest("GET", b.base+"/", nil)
	var stolen *http.Cookie
	for _, ck := range c.Jar.Cookies(u.URL) {
		if ck.Name == "__Host-bastion_session" {
			stolen = ck
		}
	}
	if stolen == nil {
		t.Fatal("no __Host-bastion_session cookie after login")
	}
	if r := b.do(t, c, "GET", "/api/v1/session", nil, nil); r.code != http.StatusOK {
		t.Fatalf("session before logout: %d", r.code)
	}
	if r := b.do(t, c, "DELETE", "/api/v1/session", nil, csrf(tok)); r.code != http.StatusNoContent {
		t.Fatalf("logout: %d %s", r.code, r.body)
	}
	replay := b.client(t)
	hdr := map[string]string{"Cookie": stolen.Name + "=" + stolen.Value}
	if r := b.do(t, replay, "GET", "/api/v1/session", nil, hdr); r.code != http.StatusUnauthorized {
		t.Errorf("replayed cookie after logout: %d %s, want 401", r.code, r.body)
	}
	if r := b.do(t, replay, "GET", "/devices", nil, hdr); r.code != http.StatusSeeOther || r.hdr.Get("Location") != "/login" {
		t.Errorf("replayed cookie on a page: %d %q, want 303 to /login", r.code, r.hdr.Get("Location"))
	}
}

func TestSessionCookieAttributesAndRotation(t *testing.T) {
	b := startBox(t)
	b.setupAdmin(t, "root")
	c := b.client(t)
	r := b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": "root", "password": goodPassword}, nil)
	sc := r.hdr.Get("Set-Cookie")
	for _, want := range []string{"__Host-bastion_session=", "Path=/", "HttpOnly", "Secure", "SameSite=Strict"} {
		if !strings.Contains(sc, want) {
			t.Errorf("Set-Cookie %q lacks %q", sc, want)
		}
	}
	if strings.Contains(sc, "Domain=") {
		t.Errorf("Set-Cookie %q has a Domain", sc)
	}
	id1 := strings.TrimPrefix(strings.SplitN(sc, ";", 2)[0], "__Host-bastion_session=")
	if len(id1) != 43 {
		t.Errorf("session id %q: want 43 base64url characters (256 bits)", id1)
	}
	// Logging in again with the old cookie gets a new id; the old one dies.
	r = b.do(t, c, "POST", "/api/v1/session", map[string]string{"user": "root", "password": goodPassword}, nil)
	id2 := strings.TrimPrefix(strings.SplitN(r.hdr.Get("Set-Cookie"), ";", 2)[0], "__Host-bastion_session=")
	if id2 == id1 || id2 == "" {
		t.Fatalf("session id not rotated at login: %q then %q", id1, id2)
	}
	if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, map[string]string{"Cookie": "__Host-bastion_session=" + id1}); r.code != http.StatusUnauthorized {
		t.Errorf("old session id after a new login: %d, want 401", r.code)
	}
	// Only the hash is stored.
	if _, err := b.g.Store().Session(id2); err == nil {
		t.Error("the raw session id is a key in the store")
	}
}

func TestAPIWithoutAuthRefused(t *testing.T) {
	b := startBox(t)
	admin, tok := b.setupAdmin(t, "root")
	c := b.client(t)
	for _, ep := range []struct{ method, path string }{
		{"GET", "/api/v1/status"}, {"GET", "/api/v1/devices"}, {"POST", "/api/v1/devices"}, {"GET", "/api/v1/audit"},
		{"POST", "/api/v1/upstream/rules"}, {"GET", "/api/v1/admins"}, {"POST", "/api/v1/admins"}, {"GET", "/api/v1/privacy"},
		{"POST", "/api/v1/devices/x/revoke"}, {"GET", "/api/v1/pairing"}, {"POST", "/api/v1/tokens"},
	} {
		r := b.do(t, c, ep.method, ep.path, map[string]string{}, nil)
		if r.code != http.StatusUnauthorized || !strings.Contains(r.body, `"error"`) {
			t.Errorf("%s %s without auth: %d %s, want 401 JSON", ep.method, ep.path, r.code, r.body)
		}
	}
	for _, az := range []string{"Bearer nope", "Basic cm9vdDpwdw==", "Bearer " + strings.Repeat("x", 43)} {
		if r := b.do(t, c, "GET", "/api/v1/devices", nil, map[string]string{"Authorization": az}); r.code != http.StatusUnauthorized {
			t.Errorf("Authorization %q: %d, want 401", az, r.code)
		}
	}
	// A real token works, without a CSRF token (it is not ambient).
	r := b.do(t, admin, "POST", "/api/v1/tokens", map[string]string{"label": "ci"}, csrf(tok))
	var tv struct{ Token, ID string }
	r.json(t, &tv)
	bearer := map[string]string{"Authorization": "Bearer " + tv.Token}
	if r := b.do(t, c, "POST", "/api/v1/devices", map[string]string{"name": "via token", "auth": "psk"}, bearer); r.code != http.StatusCreated {
		t.Errorf("add device with an API token: %d %s", r.code, r.body)
	}
	if r := b.do(t, admin, "DELETE", "/api/v1/tokens/"+tv.ID, nil, csrf(tok)); r.code != http.StatusNoContent {
		t.Fatalf("delete token: %d %s", r.code, r.body)
	}
	if r := b.do(t, c, "GET", "/api/v1/devices", nil, bearer); r.code != http.StatusUnauthorized {
		t.Errorf("deleted token: %d, want 401", r.code)
	}
}

func TestViewerCannotChangeAnything(t *testing.T) {
	b := startBox(t)
	admin, tok := b.setupAdmin(t, "root")
	if r := b.do(t, admin, "POST", "/api/v1/admins", map[string]string{"name": "vera", "role": "viewer", "password": "tulip orbit canoe window"}, csrf(tok)); r.code != http.StatusCreated {
		t.Fatalf("create viewer: %d %s", r.code, r.body)
	}
	r := b.do(t, admin, "POST", "/api/v1/devices", map[string]string{"name": "lamp", "auth": "psk"}, csrf(tok))
	var cr console.Credentials
	r.json(t, &cr)
	v, vtok := b.login(t, "vera", "tulip orbit canoe window")
	if r := b.do(t, v, "GET", "/api/v1/devices", nil, nil); r.code != http.StatusOK {
		t.Errorf("viewer lists devices: %d", r.code)
	}
	for _, ep := range []struct {
		method, path string
		body         any
	}{
		{"POST", "/api/v1/devices/" + cr.ID + "/revoke", nil},
		{"PATCH", "/api/v1/devices/" + cr.ID, map[string]string{"name": "x"}},
		{"POST", "/api/v1/devices", map[string]string{"name": "y", "auth": "psk"}},
		{"POST", "/api/v1/upstream/rules", map[string]string{"topic": "devices/#", "action": "forward"}},
		{"POST", "/api/v1/admins", map[string]string{"name": "eve", "role": "admin", "password": "tulip orbit canoe window"}},
		{"PUT", "/api/v1/admins/vera/role", map[string]string{"role": "admin"}},
		{"DELETE", "/api/v1/devices/" + cr.ID + "/data", nil},
		{"GET", "/api/v1/devices/" + cr.ID + "/export", nil},
	} {
		r := b.do(t, v, ep.method, ep.path, ep.body, csrf(vtok))
		if r.code != http.StatusForbidden {
			t.Errorf("viewer %s %s: %d %s, want 403", ep.method, ep.path, r.code, r.body)
		}
	}
	if r := b.do(t, v, "POST", "/devices/"+cr.ID+"/revoke", url.Values{"csrf": {vtok}}, nil); r.code != http.StatusForbidden {
		t.Errorf("viewer revoke form: %d, want 403", r.code)
	}
	d, _ := b.g.Store().Device(cr.ID)
	if d.Revoked || d.Name != "lamp" {
		t.Errorf("device changed by a viewer: %+v", d)
	}
	if u, _ := b.g.Store().Admin("vera"); u.Role != "viewer" {
		t.Errorf("viewer changed their own role to %q", u.Role)
	}
}

func TestDeviceNameXSSRenderedInert(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	evil := `<script>alert(1)</script><img src=x onerror=alert(2)>`
	r := b.do(t, c, "POST", "/api/v1/devices", map[string]string{"name": evil, "auth": "psk"}, csrf(tok))
	if r.code != http.StatusCreated {
		t.Fatalf("add: %d %s", r.code, r.body)
	}
	var cr console.Credentials
	r.json(t, &cr)
	for _, p := range []string{"/devices", "/devices/" + cr.ID, "/audit"} {
		r := b.do(t, c, "GET", p, nil, nil)
		if strings.Contains(r.body, "<script>alert") || strings.Contains(r.body, "<img src=x") {
			t.Errorf("%s renders the name unescaped", p)
		}
		if p != "/audit" && !strings.Contains(r.body, "&lt;script&gt;alert(1)&lt;/script&gt;") {
			t.Errorf("%s does not show the escaped name", p)
		}
		if csp := r.hdr.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
			t.Errorf("%s CSP %q", p, csp)
		}
	}
}

func TestChangeForwardingRule(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	r := b.do(t, c, "POST", "/api/v1/upstream/rules", map[string]any{"topic": "devices/+/t/temperature", "action": "forward"}, csrf(tok))
	var rule store.ForwardRule
	r.json(t, &rule)
	r = b.do(t, c, "POST", "/api/v1/upstream/rules", map[string]any{"topic": "devices/+/t/temperature", "action": "redact", "fields": []string{"location"}}, csrf(tok))
	if r.code != http.StatusOK {
		t.Fatalf("change rule: %d %s", r.code, r.body)
	}
	rs, err := b.g.Store().ForwardRules()
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, x := range rs {
		got = append(got, x.ID+" "+x.Topic+" "+x.Action+" "+strings.Join(x.Fields, ",")+" "+x.By)
	}
	if d := cmp.Diff([]string{rule.ID + " devices/+/t/temperature redact location root"}, got); d != "" {
		t.Errorf("rules the upstream link reads (-want +got):\n%s", d)
	}
	for _, bad := range []map[string]any{
		{"topic": "other/#", "action": "forward"}, {"topic": "devices/#/x", "action": "forward"},
		{"topic": "devices/a+", "action": "forward"}, {"topic": "devices/+", "action": "drop"},
		{"topic": "devices/+", "action": "redact"}, {"topic": "devices/+", "action": "forward", "fields": []string{"a"}},
		{"topic": "devices/+", "action": "forward", "extra": 1},
	} {
		if r := b.do(t, c, "POST", "/api/v1/upstream/rules", bad, csrf(tok)); r.code != http.StatusBadRequest {
			t.Errorf("rule %v: %d %s, want 400", bad, r.code, r.body)
		}
	}
}

func TestRecoveryNeedsACodeFromTheBox(t *testing.T) {
	b := startBox(t)
	b.setupAdmin(t, "root")
	c := b.client(t)
	in := map[string]string{"code": "AAAA-BBBB-CCCC-DDDD", "user": "root", "password": "new lantern pebble river"}
	if r := b.do(t, c, "POST", "/api/v1/recover", in, nil); r.code != http.StatusForbidden {
		t.Fatalf("recovery with a made-up code: %d %s", r.code, r.body)
	}
	code, err := b.g.Console().NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	in["code"] = code
	if r := b.do(t, c, "POST", "/api/v1/recover", in, nil); r.code != http.StatusOK {
		t.Fatalf("recovery with the box's code: %d %s", r.code, r.body)
	}
	b.login(t, "root", "new lantern pebble river")
	in["password"] = "another lantern pebble"
	if r := b.do(t, c, "POST", "/api/v1/recover", in, nil); r.code != http.StatusForbidden {
		t.Errorf("recovery code used twice: %d %s, want 403", r.code, r.body)
	}
}

// newToken makes an API token for c's user and returns it.
func (b *box) newToken(t *testing.T, c *http.Client, csrfTok, label string) string {
	t.Helper()
	r := b.do(t, c, "POST", "/api/v1/tokens", map[string]string{"label": label}, csrf(csrfTok))
	if r.code != http.StatusCreated {
		t.Fatalf("create token %s: %d %s", label, r.code, r.body)
	}
	var v struct{ Token string }
	r.json(t, &v)
	return v.Token
}

func bearer(tok string) map[string]string { return map[string]string{"Authorization": "Bearer " + tok} }

// lastAudit is the detail of the newest audit event of action.
func (b *box) lastAudit(t *testing.T, c *http.Client, action string) string {
	t.Helper()
	var es []store.Event
	b.do(t, c, "GET", "/api/v1/audit", nil, nil).json(t, &es)
	for _, e := range es {
		if e.Action == action {
			return e.Detail
		}
	}
	t.Fatalf("no %s in the audit log", action)
	return ""
}

// API tokens never expire: a password recovery deletes the account's,
// and so does a password change (the one it came with too), as both end
// the sessions. Another account's tokens stay.
func TestRecoveryAndPasswordChangeDeleteAPITokens(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	rootTokens := []string{b.newToken(t, c, tok, "ci"), b.newToken(t, c, tok, "backup")}
	if r := b.do(t, c, "POST", "/api/v1/admins", map[string]string{"name": "bob", "role": "viewer", "password": "amber lantern pebble river"}, csrf(tok)); r.code != http.StatusCreated {
		t.Fatalf("add bob: %d %s", r.code, r.body)
	}
	bc, btok := b.login(t, "bob", "amber lantern pebble river")
	bobToken := b.newToken(t, bc, btok, "bob")
	for _, tk := range append(rootTokens, bobToken) {
		if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, bearer(tk)); r.code != http.StatusOK {
			t.Fatalf("token before recovery: %d %s", r.code, r.body)
		}
	}

	code, err := b.g.Console().NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	in := map[string]string{"code": code, "user": "root", "password": "new lantern pebble river"}
	if r := b.do(t, b.client(t), "POST", "/api/v1/recover", in, nil); r.code != http.StatusOK {
		t.Fatalf("recovery: %d %s", r.code, r.body)
	}
	for i, tk := range rootTokens {
		if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, bearer(tk)); r.code != http.StatusUnauthorized {
			t.Errorf("root's token %d after recovery: %d, want 401", i, r.code)
		}
	}
	if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, bearer(bobToken)); r.code != http.StatusOK {
		t.Errorf("bob's token after root's recovery: %d, want 200", r.code)
	}
	c, tok = b.login(t, "root", "new lantern pebble river")
	if got, want := b.lastAudit(t, c, "console.recover"), "password set with the recovery code; sessions ended, 2 API token(s) deleted"; got != want {
		t.Errorf("recovery audited %q, want %q", got, want)
	}

	// A change through a session: the session stays, tokens go.
	rootToken := b.newToken(t, c, tok, "ci")
	pw := map[string]string{"current": "new lantern pebble river", "new": "third lantern pebble river"}
	if r := b.do(t, c, "PUT", "/api/v1/account/password", pw, csrf(tok)); r.code != http.StatusNoContent {
		t.Fatalf("password change: %d %s", r.code, r.body)
	}
	if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, bearer(rootToken)); r.code != http.StatusUnauthorized {
		t.Errorf("root's token after a password change: %d, want 401", r.code)
	}
	if r := b.do(t, c, "GET", "/api/v1/session", nil, nil); r.code != http.StatusOK {
		t.Errorf("the session that changed the password: %d, want 200", r.code)
	}
	if got, want := b.lastAudit(t, c, "admin.password"), "other sessions ended, 1 API token(s) deleted"; got != want {
		t.Errorf("password change audited %q, want %q", got, want)
	}

	// A change through a token: that token goes too.
	pw = map[string]string{"current": "amber lantern pebble river", "new": "amber second lantern pebble"}
	if r := b.do(t, b.client(t), "PUT", "/api/v1/account/password", pw, bearer(bobToken)); r.code != http.StatusNoContent {
		t.Fatalf("bob's password change by token: %d %s", r.code, r.body)
	}
	if r := b.do(t, b.client(t), "GET", "/api/v1/session", nil, bearer(bobToken)); r.code != http.StatusUnauthorized {
		t.Errorf("the token that changed bob's password, after: %d, want 401", r.code)
	}
}

func TestUnknownJSONAndOversizedBodiesRefused(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	big := `{"name":"` + strings.Repeat("a", 70<<10) + `","auth":"psk"}`
	for name, body := range map[string]string{"unknown field": `{"name":"a","auth":"psk","admin":true}`, "trailing": `{"name":"a","auth":"psk"}{}`, "too big": big, "not json": `name=a`} {
		if r := b.do(t, c, "POST", "/api/v1/devices", body, csrf(tok)); r.code != http.StatusBadRequest {
			t.Errorf("%s: %d %.200s, want 400", name, r.code, r.body)
		}
	}
}

// The recovery code comes from the root-only control socket (what
// `bastionctl console recover` will call), never from the network.
func TestRecoveryCodeFromTheControlSocket(t *testing.T) {
	b := startBox(t)
	b.setupAdmin(t, "root")
	var out struct{ Code string }
	if _, err := control.New(control.SocketPath(b.dir)).Do(context.Background(), "POST", "/v1/console/recover", nil, &out); err != nil {
		t.Fatalf("control socket: %v", err)
	}
	c := b.client(t)
	in := map[string]string{"code": out.Code, "user": "root", "password": "new lantern pebble river"}
	if r := b.do(t, c, "POST", "/api/v1/recover", in, nil); r.code != http.StatusOK {
		t.Fatalf("recover with the socket's code: %d %s", r.code, r.body)
	}
	// No such thing over HTTPS.
	if r := b.do(t, c, "POST", "/api/v1/recovery-code", nil, nil); r.code != http.StatusNotFound {
		t.Errorf("recovery code over the network: %d", r.code)
	}
}

func TestExportAndEraseDeviceData(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	r := b.do(t, c, "POST", "/api/v1/devices", map[string]string{"name": "bedroom sensor", "auth": "psk", "vendor": "Acme", "model": "T1"}, csrf(tok))
	var cr console.Credentials
	r.json(t, &cr)
	b.do(t, c, "PATCH", "/api/v1/devices/"+cr.ID, map[string]string{"name": "bedroom sensor 2"}, csrf(tok))
	// A firmware status report kept from a run with the firmware cache on
	// (this box has it off, so the console erases it from the store itself).
	fw := `{"state":"failed","version":"1.2","detail":"verification failed","at":"2026-11-24T10:00:00Z"}`
	if err := b.g.Store().PutFirmwareStatuses(map[string][]byte{cr.ID: []byte(fw)}); err != nil {
		t.Fatal(err)
	}
	// Retained MQTT messages of the device, kept from a run, and one of a
	// device whose id starts with this one's.
	retained := map[string]string{
		"devices/" + cr.ID + "/t/temp":   `{"topic":"devices/` + cr.ID + `/t/temp","payload":"MjEuNQ=="}`,
		"devices/" + cr.ID + "/s/online": `{"topic":"devices/` + cr.ID + `/s/online","payload":"MQ=="}`,
	}
	other := "devices/" + cr.ID + "x/t/temp"
	for topic, v := range map[string]string{other: `{"payload":"OQ=="}`, "devices/" + cr.ID + "/t/temp": retained["devices/"+cr.ID+"/t/temp"], "devices/" + cr.ID + "/s/online": retained["devices/"+cr.ID+"/s/online"]} {
		if err := b.g.Store().PutRetained(topic, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	r = b.do(t, c, "GET", "/api/v1/devices/"+cr.ID+"/export", nil, nil)
	var ex struct {
		Device         store.Device
		Audit          []store.Event
		FirmwareStatus json.RawMessage            `json:"firmware_status"`
		Retained       map[string]json.RawMessage `json:"retained"`
	}
	r.json(t, &ex)
	if r.code != http.StatusOK || ex.Device.Name != "bedroom sensor 2" || ex.Device.Vendor != "Acme" || !strings.Contains(r.hdr.Get("Content-Disposition"), "attachment") {
		t.Errorf("export: %d %+v %q", r.code, ex.Device, r.hdr.Get("Content-Disposition"))
	}
	var gotFW, wantFW map[string]any
	json.Unmarshal(ex.FirmwareStatus, &gotFW)
	json.Unmarshal([]byte(fw), &wantFW)
	if d := cmp.Diff(wantFW, gotFW); d != "" {
		t.Errorf("exported firmware_status (-want +got):\n%s", d)
	}
	gotRetained := map[string]string{}
	for topic, v := range ex.Retained {
		var compact bytes.Buffer
		json.Compact(&compact, v)
		gotRetained[topic] = compact.String()
	}
	if d := cmp.Diff(retained, gotRetained); d != "" {
		t.Errorf("exported retained messages (-want +got):\n%s", d)
	}
	var actions []string
	for _, e := range ex.Audit {
		actions = append(actions, e.Action)
	}
	if d := cmp.Diff([]string{"device.rename", "device.add"}, actions); d != "" {
		t.Errorf("exported audit events (-want +got):\n%s", d)
	}
	if r := b.do(t, c, "DELETE", "/api/v1/devices/"+cr.ID+"/data", nil, csrf(tok)); r.code != http.StatusNoContent {
		t.Fatalf("erase: %d %s", r.code, r.body)
	}
	d, err := b.g.Store().Device(cr.ID)
	if err != nil || !d.Revoked || d.Name != "erased-"+cr.ID || d.Vendor != "" || d.Model != "" {
		t.Errorf("after erase: %+v %v, want revoked with no name, vendor or model", d, err)
	}
	if !b.g.CA().Revocations().Revoked(cr.ID, "") {
		t.Error("erased device's credentials are not revoked")
	}
	if _, err := b.g.Store().FirmwareStatus(cr.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("erased device's firmware status still stored: %v", err)
	}
	var left []string
	b.g.Store().ForEachRetained(func(topic string, _ []byte) error { left = append(left, topic); return nil })
	if d := cmp.Diff([]string{other}, left); d != "" {
		t.Errorf("retained messages after the erase (-want +got):\n%s", d)
	}
	if r := b.do(t, c, "GET", "/api/v1/devices/nosuch/export", nil, nil); r.code != http.StatusNotFound {
		t.Errorf("export unknown device: %d", r.code)
	}
}

func TestExpectDeviceByCodeOverAPI(t *testing.T) {
	b := startBox(t)
	c, tok := b.setupAdmin(t, "root")
	for _, bad := range []map[string]string{{"name": "x", "code": "12"}, {"name": "x", "code": "<script>alert(1)</script>"}, {"name": "", "code": "34970112332"}} {
		if r := b.do(t, c, "POST", "/api/v1/pairing/expected", bad, csrf(tok)); r.code != http.StatusBadRequest {
			t.Errorf("expect %v: %d, want 400", bad, r.code)
		}
	}
	if r := b.do(t, c, "POST", "/api/v1/pairing/expected", map[string]string{"name": "door", "code": "MT:Y.K9042C00KA0648G00"}, csrf(tok)); r.code != http.StatusCreated || strings.Contains(r.body, "MT:") {
		t.Fatalf("expect: %d %s (the code must not be echoed)", r.code, r.body)
	}
	r := b.do(t, c, "GET", "/api/v1/pairing", nil, nil)
	var st struct {
		Available bool
		Window    struct{ Open bool }
		Expected  []struct{ ID, Name, Code string }
	}
	r.json(t, &st)
	if !st.Available || st.Window.Open || len(st.Expected) != 1 || st.Expected[0].Name != "door" || strings.Contains(r.body, "K9042") {
		t.Errorf("pairing state: %s", r.body)
	}
	if r := b.do(t, c, "DELETE", "/api/v1/pairing/expected/"+st.Expected[0].ID, nil, csrf(tok)); r.code != http.StatusNoContent {
		t.Errorf("withdraw: %d", r.code)
	}
}

package console

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/store"
)

func TestCheckPassword(t *testing.T) {
	for _, tc := range []struct {
		user, pw string
		want     string // substring of the error, "" = accepted
	}{
		{"root", "correct horse battery staple", ""},
		{"root", "tulip orbit canoe window", ""},
		{"root", "Vy8#kq2!Lm0@zR", ""},
		{"root", "short", "too short"},
		{"root", "elevenchars", "too short"},
		{"root", "password", "too short"},
		{"root", "Password1234", "too common"},
		{"root", "P@ssw0rd2024!", "too common"},
		{"root", "letmein!letmein!", "too common"},
		{"root", "SummerWinter2025", "too common"},
		{"root", "adminpassword", "too common"},
		{"root", "Bastion2026!!", "too common"},
		{"root", "qwertyuiop123", "too common"},
		{"root", "qwertyuiopas", "sequence"},
		{"root", "123456789012", "no letters"},
		{"root", "p4ssw0rdadm1n", "too common"},
		{"root", "2024-01-01!!!", "no letters"},
		{"root", "aaaaaaaaaaaaaaaa", "different"},
		{"root", "abcabcabcabcabc", "different"},
		{"alice", "my name is Alice!", "user name"},
		{"alice", "my name is 4l1ce!", "user name"},
		{"root", strings.Repeat("ab1!xyz9", 40), "too long"},
		{"root", "\xff\xfe invalid utf8 bytes", "UTF-8"},
	} {
		err := CheckPassword(tc.user, tc.pw)
		if tc.want == "" {
			if err != nil {
				t.Errorf("CheckPassword(%q, %q) = %v, want accepted", tc.user, tc.pw, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CheckPassword(%q, %q) = %v, want an error with %q", tc.user, tc.pw, err, tc.want)
		}
	}
}

func TestHashVerify(t *testing.T) {
	h := newHasher(1)
	ctx := context.Background()
	e1, _ := h.hash(ctx, "correct horse battery staple")
	e2, _ := h.hash(ctx, "correct horse battery staple")
	if e1 == e2 {
		t.Error("two hashes of one password are equal: salt not random")
	}
	if ok, err := h.verify(ctx, e1, "correct horse battery staple"); !ok || err != nil {
		t.Errorf("verify right password: %v %v", ok, err)
	}
	if ok, _ := h.verify(ctx, e1, "correct horse battery stapler"); ok {
		t.Error("verify wrong password: ok")
	}
	if ok, err := h.verify(ctx, dummyHash, "x"); ok || err != nil {
		t.Errorf("dummy hash: %v %v", ok, err)
	}
	for _, bad := range []string{"", "$argon2i$v=19$m=19456,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",
		"$argon2id$v=19$m=4194304,t=2,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA", "$argon2id$v=19$m=19456,t=2,p=1$!!$AAAA"} {
		if _, err := h.verify(ctx, bad, "x"); err == nil {
			t.Errorf("verify accepted the encoding %q", bad)
		}
	}
}

// TestThrottleKeys: a failed login counts against the user and the source
// separately, each with its own free failures (the backoff itself:
// internal/throttle's TestBackoffDoubles).
func TestThrottleKeys(t *testing.T) {
	th := newThrottle(ThrottlePolicy{FreeUser: 3, FreeSource: 100, Base: 10 * time.Second, Max: 80 * time.Second, Forget: time.Hour}, throttleKeys)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for range 3 {
		th.failLogin(now, "root", "10.0.0.2")
	}
	if until := th.LockedUntil(now, "u:root"); until.Sub(now) != 10*time.Second {
		t.Errorf("user locked until %v after 3 failures with FreeUser 3, want 10 s", until.Sub(now))
	}
	if !th.LockedUntil(now, "s:10.0.0.2").IsZero() {
		t.Error("source locked after 3 failures with FreeSource 100")
	}
	th.Reset("u:root")
	if !th.LockedUntil(now, "u:root").IsZero() {
		t.Error("locked after reset")
	}
}

func TestLANSource(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:5": true, "[::1]:5": true, "192.168.1.20:5": true, "10.1.2.3:5": true, "172.16.0.9:5": true,
		"[fd00::1]:5": true, "[fe80::1]:5": true, "[::ffff:192.168.0.2]:5": true,
		"8.8.8.8:5": false, "[2001:db8::1]:5": false, "100.64.0.1:5": false, "garbage": false, "": false,
	} {
		if got := lanSource(addr); got != want {
			t.Errorf("lanSource(%q) = %v, want %v", addr, got, want)
		}
	}
}

func TestParseBearer(t *testing.T) {
	tok := strings.Repeat("Ab-_9", 9)
	for in, want := range map[string]string{
		"Bearer " + tok: tok, "bearer " + tok: tok, "Bearer  " + tok + " ": tok,
		"Basic " + tok: "", "Bearer": "", "Bearer short": "", "Bearer " + tok + "!": "", "Bearer " + strings.Repeat("a", 200): "",
	} {
		got, ok := parseBearer(in)
		if got != want || ok != (want != "") {
			t.Errorf("parseBearer(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
}

func TestSecurityHeadersOnEveryAnswer(t *testing.T) {
	for _, p := range []string{"/static/app.css", "/login", "/api/v1/devices", "/nope"} {
		w := httptest.NewRecorder()
		SecurityHeaders(http404()).ServeHTTP(w, httptest.NewRequest("GET", p, nil))
		for _, k := range []string{"Strict-Transport-Security", "Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options"} {
			if w.Header().Get(k) == "" {
				t.Errorf("%s: no %s", p, k)
			}
		}
	}
}

// Every embedded asset is referenced by a template and no template uses
// inline script, inline style or an external URL.
func TestTemplatesHaveNoInlineScriptOrExternalResource(t *testing.T) {
	files, _ := filepath.Glob("templates/*.html")
	for _, f := range files {
		b, _ := os.ReadFile(f)
		s := string(b)
		for _, bad := range []string{"<script>", "style=", " on", "javascript:", "http://", "https://", "<style"} {
			if bad == " on" {
				for _, attr := range []string{" onclick", " onload", " onerror", " onsubmit", " onchange"} {
					if strings.Contains(s, attr) {
						t.Errorf("%s has an inline handler %q", f, attr)
					}
				}
				continue
			}
			if strings.Contains(s, bad) {
				t.Errorf("%s contains %q", f, bad)
			}
		}
	}
}

func FuzzParseRule(f *testing.F) {
	seedJSON(f, "testdata/rules.jsonl")
	f.Fuzz(func(t *testing.T, topic, action, fields string) {
		r, err := parseRule(ruleInput{Topic: topic, Action: action, Fields: splitFields(fields)})
		if err != nil {
			return
		}
		if !strings.HasPrefix(r.Topic, "devices/") || len(r.Topic) > 256 {
			t.Fatalf("accepted topic %q", r.Topic)
		}
		for i, l := range strings.Split(r.Topic, "/") {
			if strings.ContainsAny(l, "+#") && len(l) != 1 || l == "#" && i != strings.Count(r.Topic, "/") {
				t.Fatalf("accepted a misplaced wildcard in %q", r.Topic)
			}
		}
		if (r.Action == "redact") != (len(r.Fields) > 0) {
			t.Fatalf("action %q with fields %q", r.Action, r.Fields)
		}
		// The upstream link must take what the console saves: it validates
		// the console's rules with bastion.yaml's when it starts.
		c := upstream.Config{Broker: "mqtts://cloud.example:8883", CAFile: "ca", CertFile: "crt", KeyFile: "key", Gateway: "gw1",
			Forward: []upstream.Rule{{Topic: r.Topic, Action: r.Action, Fields: r.Fields}}}
		c.Defaults()
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted a rule the upstream link refuses: %v", err)
		}
	})
}

func seedJSON(f *testing.F, path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		var in struct{ Topic, Action, Fields string }
		if err := json.Unmarshal([]byte(l), &in); err != nil {
			f.Fatalf("%s: %v", path, err)
		}
		f.Add(in.Topic, in.Action, in.Fields)
	}
}

func seedLines(f *testing.F, path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		f.Add(strings.TrimSuffix(l, "\n"))
	}
}

func FuzzParseBearer(f *testing.F) {
	seedLines(f, "testdata/authorization.txt")
	f.Fuzz(func(t *testing.T, s string) {
		tok, ok := parseBearer(s)
		if ok && (len(tok) < 16 || len(tok) > 128 || strings.ContainsAny(tok, " \t\r\n")) {
			t.Fatalf("parseBearer(%q) accepted %q", s, tok)
		}
	})
}

func FuzzParseSetupCode(f *testing.F) {
	seedLines(f, "testdata/setup-codes.txt")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := parseSetupCode(s)
		if err != nil {
			return
		}
		if len(c) < 8 || len(c) > 64 || strings.ContainsAny(c, " <>\"'&") {
			t.Fatalf("parseSetupCode(%q) accepted %q", s, c)
		}
	})
}

func FuzzCheckPassword(f *testing.F) {
	for _, s := range []string{"correct horse battery staple", "P@ssw0rd2024!", "letmein!letmein!", "\xff", ""} {
		f.Add("root", s)
	}
	f.Fuzz(func(t *testing.T, user, pw string) {
		if CheckPassword(user, pw) == nil && (len([]rune(pw)) < MinPasswordLen || len(pw) > MaxPasswordLen) {
			t.Fatalf("accepted %q", pw)
		}
	})
}

func FuzzParsePage(f *testing.F) {
	for _, s := range [][2]string{{"100", ""}, {"", "42"}, {"0", "-1"}, {"501", "x"}, {"1e3", "18446744073709551616"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, l, b string) {
		limit, _, err := parsePage(l, b)
		if err == nil && (limit < 1 || limit > 500) {
			t.Fatalf("parsePage(%q) limit %d", l, limit)
		}
	})
}

func http404() http.Handler { return http.NotFoundHandler() }

// BenchmarkPasswordVerify measures one login's argon2id cost (19 MiB, t=2):
// the price of each guess for an attacker and of each login for the box.
func BenchmarkPasswordVerify(b *testing.B) {
	h := newHasher(1)
	enc, _ := h.hash(context.Background(), "correct horse battery staple")
	b.ReportAllocs()
	for b.Loop() {
		h.verify(context.Background(), enc, "correct horse battery staple")
	}
}

// BenchmarkCheckPassword measures the strength check (runs on every
// password set).
func BenchmarkCheckPassword(b *testing.B) {
	for b.Loop() {
		CheckPassword("root", "correct horse battery staple")
	}
}

// A source in a prefix of the LAN interfaces' addresses (a global IPv6
// one, which lanSource does not accept) is served; one outside them is
// refused, and without LANPrefixes only lanSource's are served.
func TestLANPrefixesAccepted(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	lan := []netip.Prefix{netip.MustParsePrefix("2001:db8:1:2::/64"), netip.MustParsePrefix("198.51.100.0/24")}
	with, err := NewHandler(Options{Store: st, Gateway: stubGateway{}, LANPrefixes: func() []netip.Prefix { return lan }})
	if err != nil {
		t.Fatal(err)
	}
	without, err := NewHandler(Options{Store: st, Gateway: stubGateway{}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		h      *Handler
		remote string
		want   int
	}{
		{with, "[2001:db8:1:2:aaaa::99]:4000", http.StatusOK},
		{with, "198.51.100.7:4000", http.StatusOK},
		{with, "[::ffff:198.51.100.7]:4000", http.StatusOK},
		{with, "[2001:db8:1:3::99]:4000", http.StatusForbidden},
		{with, "203.0.113.7:4000", http.StatusForbidden},
		{with, "10.0.0.5:4000", http.StatusOK},
		{without, "[2001:db8:1:2:aaaa::99]:4000", http.StatusForbidden},
		{without, "10.0.0.5:4000", http.StatusOK},
	} {
		r := httptest.NewRequest("GET", "/healthz", nil)
		r.RemoteAddr = tc.remote
		w := httptest.NewRecorder()
		tc.h.ServeHTTP(w, r)
		if w.Code != tc.want {
			t.Errorf("from %s (LANPrefixes set: %v): %d, want %d", tc.remote, tc.h == with, w.Code, tc.want)
		}
	}
}

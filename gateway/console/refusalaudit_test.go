package console

import (
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/gateway/store"
)

// login posts a login from remote (an "addr:port") straight to h, as
// the JSON API takes it, and returns the status.
func login(h *Handler, remote, user, password string) int {
	r := httptest.NewRequest("POST", "/api/v1/session", strings.NewReader(fmt.Sprintf(`{"user":%q,"password":%q}`, user, password)))
	r.Header.Set("Content-Type", "application/json")
	r.RemoteAddr = remote
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w.Code
}

// A host that takes a new address of its /64 and a new user name at every
// attempt is held to the /64's FreeSource failures, then locked out on
// any address of that /64 (even with the right password); another /64
// is not.
func TestLoginThrottleHoldsRotatingIPv6Addresses(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(ThrottlePolicy{FreeUser: 100, FreeSource: 4, Base: time.Minute, Max: time.Hour, Forget: time.Hour}, throttleKeys)
	for i := range 4 {
		if code := login(h, fmt.Sprintf("[fd00:1:2:3::%x]:4000", i+1), fmt.Sprintf("user%d", i), "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d, want 401", i, code)
		}
	}
	if code := login(h, "[fd00:1:2:3:aaaa:bbbb:cccc:dddd]:4000", "root", "correct horse battery staple"); code != http.StatusTooManyRequests {
		t.Errorf("right password from a fresh address of the same /64: %d, want 429", code)
	}
	if code := login(h, "[fd00:1:2:4::1]:4000", "root", "correct horse battery staple"); code != http.StatusCreated {
		t.Errorf("right password from another /64: %d, want 201", code)
	}
}

// A source locked out that floods made-up user names is refused without
// adding a key for each, so it cannot push the lockout of the account it
// is guessing out of the bounded throttle and get fresh guesses.
func TestLockedOutSourceCannotFloodOutALockout(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(ThrottlePolicy{FreeUser: 5, FreeSource: 3, Base: time.Hour, Max: time.Hour, Forget: 24 * time.Hour}, 50)
	for i := range 5 { // root locked out, from five sources
		clk.add(time.Second)
		if code := login(h, fmt.Sprintf("10.0.0.%d:4000", i+1), "root", "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("guess %d at root: %d, want 401", i, code)
		}
	}
	for i := range 3 { // the attacker's source locked out
		clk.add(time.Second)
		if code := login(h, "10.0.0.66:4000", fmt.Sprintf("a%d", i), "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("guess %d from the attacker: %d, want 401", i, code)
		}
	}
	held := h.thr.Len()
	for i := range 200 {
		clk.add(time.Millisecond)
		if code := login(h, "10.0.0.66:4000", fmt.Sprintf("n%d", i), "wrong wrong wrong"); code != http.StatusTooManyRequests {
			t.Fatalf("name %d from the locked-out source: %d, want 429", i, code)
		}
	}
	if n := h.thr.Len(); n != held {
		t.Errorf("the throttle holds %d keys after the refused flood, %d before: refused requests added keys", n, held)
	}
	// A source with no failure has its password checked even while root
	// is locked out (TestLockedOutUserLogsInFromACleanSource); one that
	// failed, as each of the five did, is refused while it lasts.
	if code := login(h, "10.0.0.1:4000", "root", "correct horse battery staple"); code != http.StatusTooManyRequests {
		t.Errorf("root's right password from a source that failed against it, after the flood: %d, want 429 (root's lockout was pushed out)", code)
	}
}

// sourceKeys: an IPv6 source is counted by its address and its /64, a
// link-local one by its /64 on its interface; an IPv4 (or IPv4-mapped)
// one by its address only.
func TestSourceKeys(t *testing.T) {
	for src, want := range map[string][]string{
		"10.0.0.2":               {"s:10.0.0.2"},
		"::ffff:10.0.0.2":        {"s:::ffff:10.0.0.2"},
		"fd00:1:2:3:4:5:6:7":     {"s:fd00:1:2:3:4:5:6:7", "p:fd00:1:2:3::/64"},
		"fe80::1234%eth1":        {"s:fe80::1234%eth1", "p:fe80::/64%eth1"},
		"fe80::99%eth2":          {"s:fe80::99%eth2", "p:fe80::/64%eth2"},
		"not an address":         {"s:not an address"},
		"2001:db8:aa:bb:cc::1":   {"s:2001:db8:aa:bb:cc::1", "p:2001:db8:aa:bb::/64"},
		"2001:db8:aa:bb:ffff::1": {"s:2001:db8:aa:bb:ffff::1", "p:2001:db8:aa:bb::/64"},
	} {
		if got := sourceKeys(src); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("sourceKeys(%q) = %q, want %q", src, got, want)
		}
	}
}

// auditedOf is the audit events of action, oldest first.
func auditedOf(t *testing.T, st *store.Store, action string) []store.Event {
	t.Helper()
	es, err := st.AuditLog(1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []store.Event
	for i := len(es) - 1; i >= 0; i-- {
		if es[i].Action == action {
			out = append(out, es[i])
		}
	}
	return out
}

// Failed logins are each counted in the metric, but audited at most once
// per minute: the first at once, the next after the minute with how many
// were not; a successful login writes the count still held.
func TestFailedLoginsAuditedSpaced(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	h.thr = newThrottle(ThrottlePolicy{FreeUser: 1000, FreeSource: 1000, Base: time.Minute, Max: time.Hour, Forget: time.Hour}, throttleKeys)
	before := testutil.ToFloat64(h.refusals.WithLabelValues(ReasonBadLogin))
	start := clk.now()
	for i := range 30 { // every 5 s: audited at 0, 60 and 120 s
		if code := login(h, fmt.Sprintf("[fd00::%x]:4000", i+1), fmt.Sprintf("u%d", i), "wrong wrong wrong"); code != http.StatusUnauthorized {
			t.Fatalf("failure %d: %d, want 401", i, code)
		}
		clk.add(5 * time.Second)
	}
	if got := testutil.ToFloat64(h.refusals.WithLabelValues(ReasonBadLogin)) - before; got != 30 {
		t.Errorf("bad_login counted %v times, want 30", got)
	}
	es := auditedOf(t, h.o.Store, "console.login_failed")
	want := []string{
		"",
		"11 more refused since " + start.Format(time.RFC3339) + ", not audited one by one",
		"11 more refused since " + start.Add(time.Minute).Format(time.RFC3339) + ", not audited one by one",
	}
	if len(es) != len(want) {
		t.Fatalf("%d console.login_failed events, want %d: %+v", len(es), len(want), es)
	}
	for i, e := range es {
		if e.Detail != want[i] {
			t.Errorf("event %d: detail %q, want %q", i, e.Detail, want[i])
		}
	}
	if es[0].Target != "u0" || es[0].Remote != "fd00::1" {
		t.Errorf("first event: target %q from %q, want u0 from fd00::1", es[0].Target, es[0].Remote)
	}
	// 5 more held (at 125..145 s); the next login writes them.
	if code := login(h, "[fd00::99]:4000", "root", "correct horse battery staple"); code != http.StatusCreated {
		t.Fatalf("login: %d, want 201", code)
	}
	es = auditedOf(t, h.o.Store, "console.login_failed")
	if last := es[len(es)-1].Detail; len(es) != 4 || !strings.HasPrefix(last, "5 more refused since "+start.Add(2*time.Minute).Format(time.RFC3339)) || !strings.HasSuffix(last, "(written at a successful login)") {
		t.Errorf("after the login: %d events, the last %q; want 4, the last the 5 held", len(es), last)
	}
	// Started afresh: the next failure is audited at once.
	login(h, "[fd00::1]:4000", "u0", "wrong wrong wrong")
	if es = auditedOf(t, h.o.Store, "console.login_failed"); len(es) != 5 || es[4].Detail != "" {
		t.Errorf("failure after the login: %d events (last %+v), want 5, the last one for it", len(es), es[len(es)-1])
	}
}

// Wrong setup codes are throttled per /64 too (a host rotating addresses
// is held to 5), each counted, and audited once within the minute.
func TestSetupCodeGuessesFromRotatingIPv6Addresses(t *testing.T) {
	h, _, _ := newTestHandler(t)
	setup := func(remote, code string) int {
		r := httptest.NewRequest("POST", "/api/v1/setup", strings.NewReader(fmt.Sprintf(`{"code":%q,"user":"root","password":"correct horse battery staple"}`, code)))
		r.Header.Set("Content-Type", "application/json")
		r.RemoteAddr = remote
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w.Code
	}
	before := testutil.ToFloat64(h.refusals.WithLabelValues(ReasonBadCode))
	for i := range 5 {
		if code := setup(fmt.Sprintf("[fe80::%x%%eth1]:4000", i+1), "WRONG-CODE-0000"); code != http.StatusForbidden {
			t.Fatalf("wrong code %d: %d, want 403", i, code)
		}
	}
	if code := setup("[fe80::77%eth1]:4000", "ABCD-EFGH-JKLM-NPQR"); code != http.StatusTooManyRequests {
		t.Errorf("right code from a fresh link-local address on the same link: %d, want 429", code)
	}
	if got := testutil.ToFloat64(h.refusals.WithLabelValues(ReasonBadCode)) - before; got != 5 {
		t.Errorf("bad_code counted %v times, want 5", got)
	}
	if es := auditedOf(t, h.o.Store, "console.setup_refused"); len(es) != 1 {
		t.Errorf("%d console.setup_refused events within a minute, want 1: %+v", len(es), es)
	}
	if code := setup("[fe80::77%eth2]:4000", "ABCD-EFGH-JKLM-NPQR"); code != http.StatusCreated {
		t.Errorf("right code from the same address on another link: %d, want 201", code)
	}
}

// Refused CSRF tokens, which any signed-in user can send as fast as it
// likes with a path as long as the request line, are audited spaced (one
// event a minute, counting the others) with the path clipped. Each used
// to be audited with its whole path: a viewer could fill the audit log's
// 10,000 events with ~36 KB each.
func TestCSRFRefusalsAuditedSpacedAndClipped(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	code, cookie, _ := loginSession(t, h, "10.0.0.7:4000", "root", oldPassword)
	if code != http.StatusCreated {
		t.Fatalf("login: %d", code)
	}
	long := "/api/v1/tokens/" + strings.Repeat("a", 30000)
	refuse := func() {
		t.Helper()
		r := httptest.NewRequest("DELETE", long, nil)
		r.Header.Set("X-CSRF-Token", strings.Repeat("A", 43))
		r.AddCookie(cookie)
		r.RemoteAddr = "10.0.0.7:4000"
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusForbidden {
			t.Fatalf("wrong CSRF token: %d %s, want 403", w.Code, w.Body)
		}
	}
	for range 50 {
		refuse()
		clk.add(time.Second)
	}
	es := auditedOf(t, h.o.Store, "console.csrf_refused")
	if len(es) != 1 {
		t.Fatalf("%d console.csrf_refused events for 50 refusals within a minute, want 1", len(es))
	}
	if want := long[:maxAuditPath] + "… (30015 bytes)"; es[0].Target != want {
		t.Errorf("target %.200q (%d bytes), want the path cut after %d bytes", es[0].Target, len(es[0].Target), maxAuditPath)
	}
	clk.add(10 * time.Second)
	refuse()
	es = auditedOf(t, h.o.Store, "console.csrf_refused")
	if len(es) != 2 || !strings.HasPrefix(es[1].Detail, "49 more refused since ") {
		t.Errorf("after the minute: %d events, the last %+v; want 2, the last counting the 49", len(es), es[len(es)-1])
	}
}

// CSRF refusals are spaced per signed-in user and their held counts are
// written with that user as the actor: a viewer's flood of refusals does
// not hold back the first refusal against the admin's session, nor turn
// the admin's into a count written as "anonymous". Before, the spacing
// was per action only and a successful login wrote every held count as
// "anonymous".
func TestCSRFRefusalsAuditedPerUser(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	setUpAdmin(t, srv)
	send := func(method, path, body, csrf string, cookie *http.Cookie) int {
		t.Helper()
		r := httptest.NewRequest(method, path, strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("X-CSRF-Token", csrf)
		r.AddCookie(cookie)
		r.RemoteAddr = "10.0.0.7:4000"
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w.Code
	}
	code, root, rootCSRF := loginSession(t, h, "10.0.0.7:4000", "root", oldPassword)
	if code != http.StatusCreated {
		t.Fatalf("root's login: %d", code)
	}
	if code := send("POST", "/api/v1/admins", `{"name":"vera","role":"viewer","password":"tulip orbit canoe window"}`, rootCSRF, root); code != http.StatusCreated {
		t.Fatalf("adding the viewer: %d", code)
	}
	code, vera, _ := loginSession(t, h, "10.0.0.8:4000", "vera", "tulip orbit canoe window")
	if code != http.StatusCreated {
		t.Fatalf("vera's login: %d", code)
	}
	refuse := func(cookie *http.Cookie) {
		t.Helper()
		if code := send("DELETE", "/api/v1/tokens/x", "", strings.Repeat("A", 43), cookie); code != http.StatusForbidden {
			t.Fatalf("wrong CSRF token: %d, want 403", code)
		}
		clk.add(time.Second)
	}
	for range 5 {
		refuse(vera) // audited once, 4 held
	}
	refuse(root) // audited at once
	refuse(root) // held
	type event struct{ Actor, Detail string }
	var got []event
	for _, e := range auditedOf(t, h.o.Store, "console.csrf_refused") {
		got = append(got, event{e.Actor, e.Detail})
	}
	if want := []event{{"vera", ""}, {"root", ""}}; !slices.Equal(got, want) {
		t.Fatalf("console.csrf_refused events %q, want %q: one user's refusals held back another's", got, want)
	}
	// A successful login writes the counts held, each with its user.
	if code, _, _ := loginSession(t, h, "10.0.0.9:4000", "root", oldPassword); code != http.StatusCreated {
		t.Fatalf("login: %d", code)
	}
	held := map[string]string{}
	for _, e := range auditedOf(t, h.o.Store, "console.csrf_refused")[2:] {
		held[e.Actor] = e.Detail[:strings.IndexByte(e.Detail, ' ')]
	}
	if want := map[string]string{"vera": "4", "root": "1"}; !maps.Equal(held, want) {
		t.Errorf("counts written at the login, by actor: %q, want %q", held, want)
	}
}

package console

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	"go.yaml.in/yaml/v3"

	"github.com/bastion-iot/bastion/gateway/store"
)

// stubGateway stands in for the gateway in the tests that need a clock the
// test controls; the real gateway is used by every other test.
type stubGateway struct{ code string }

func (s stubGateway) Health(context.Context) Health             { return Health{ClockSane: true} }
func (s stubGateway) Certificates(context.Context) []CertStatus { return nil }
func (s stubGateway) CheckSetupCode(c string) bool              { return normCode(c) == s.code }
func (s stubGateway) AddDevice(context.Context, DeviceRequest, Actor) (Credentials, error) {
	return Credentials{}, errNotAvailable
}
func (s stubGateway) RevokeDevice(context.Context, string, Actor) error { return errNotAvailable }
func (s stubGateway) DropRetained(context.Context, string) (int, error) { return 0, errNotAvailable }

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestHandler(t *testing.T) (*Handler, *httptest.Server, *fakeClock) {
	return newTestHandlerWith(t)
}

// newTestHandlerWith is newTestHandler with a store opened with opts.
func newTestHandlerWith(t *testing.T, opts ...store.Option) (*Handler, *httptest.Server, *fakeClock) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clk := &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h, err := NewHandler(Options{Store: st, Gateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}, Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(SecurityHeaders(h))
	t.Cleanup(srv.Close)
	return h, srv, clk
}

func post(t *testing.T, c *http.Client, url, body string, hdr ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func get(t *testing.T, c *http.Client, url string) int {
	t.Helper()
	res, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	return res.StatusCode
}

func TestSessionIdleAndAbsoluteExpiry(t *testing.T) {
	_, srv, clk := newTestHandler(t)
	jar, _ := cookiejar.New(nil)
	c := srv.Client()
	c.Jar = jar
	if code, body := post(t, c, srv.URL+"/api/v1/setup", `{"code":"abcd-efgh-jklm-npqr","user":"root","password":"correct horse battery staple"}`); code != 201 {
		t.Fatalf("setup: %d %s", code, body)
	}
	// Active use every 20 minutes keeps the session for up to 12 h...
	for range 36 { // 12 h
		clk.add(20 * time.Minute)
		if code := get(t, c, srv.URL+"/api/v1/session"); code != 200 {
			t.Fatalf("session at %s: %d, want 200", clk.now(), code)
		}
	}
	// ...and not beyond.
	clk.add(20 * time.Minute)
	if code := get(t, c, srv.URL+"/api/v1/session"); code != 401 {
		t.Errorf("session after 12h20m: %d, want 401", code)
	}
	// A fresh login ends after 31 idle minutes.
	if code, _ := post(t, c, srv.URL+"/api/v1/session", `{"user":"root","password":"correct horse battery staple"}`); code != 201 {
		t.Fatalf("login: %d", code)
	}
	clk.add(31 * time.Minute)
	if code := get(t, c, srv.URL+"/api/v1/session"); code != 401 {
		t.Errorf("session after 31 idle minutes: %d, want 401", code)
	}
}

// The audit page's "Older" link leads through every event the store keeps
// and is not shown on the page with the oldest kept: the store keeps only
// the newest events, so the oldest kept is not seq 1 (the link used to be
// shown whenever a page was full and did not end at seq 1, and led to an
// empty page).
func TestAuditPageOlderLinks(t *testing.T) {
	const keep = 12
	h, srv, _ := newTestHandlerWith(t, store.AuditRetention(keep))
	jar, _ := cookiejar.New(nil)
	c := srv.Client()
	c.Jar = jar
	if code, body := post(t, c, srv.URL+"/api/v1/setup", `{"code":"abcd-efgh-jklm-npqr","user":"root","password":"correct horse battery staple"}`); code != 201 {
		t.Fatalf("setup: %d %s", code, body)
	}
	for i := range 2 * keep {
		if _, err := h.o.Store.Audit(store.Event{Actor: "test", Action: "test.event", Target: strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	kept, err := h.o.Store.AuditLog(100, 0)
	if err != nil || len(kept) != keep {
		t.Fatalf("store keeps %d events (%v), want %d", len(kept), err, keep)
	}
	var want []string
	for _, e := range kept {
		want = append(want, strconv.FormatUint(e.Seq, 10))
	}
	older := regexp.MustCompile(`href="/audit\?before=(\d+)"`)
	row := regexp.MustCompile(`<tr><td>(\d+)</td>`)
	var got []string
	url := srv.URL + "/audit?limit=4" // keep is a multiple: the last page is full
	for pages := 0; url != ""; pages++ {
		if pages == 10 {
			t.Fatal("Older links go on past every kept event")
		}
		res, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Fatalf("GET %s: %d", url, res.StatusCode)
		}
		rows := row.FindAllStringSubmatch(string(body), -1)
		if len(rows) == 0 {
			t.Fatalf("GET %s: a page without events", url)
		}
		for _, m := range rows {
			got = append(got, m[1])
		}
		url = ""
		if m := older.FindStringSubmatch(string(body)); m != nil {
			url = srv.URL + "/audit?limit=4&before=" + m[1]
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("events reached through the Older links (-want +got):\n%s", diff)
	}
}

func TestLockoutEndsAndBacksOff(t *testing.T) {
	_, srv, clk := newTestHandler(t)
	c := srv.Client()
	post(t, c, srv.URL+"/api/v1/setup", `{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":"correct horse battery staple"}`)
	bad := `{"user":"root","password":"wrong wrong wrong"}`
	good := `{"user":"root","password":"correct horse battery staple"}`
	for range DefaultThrottle.FreeUser {
		post(t, c, srv.URL+"/api/v1/session", bad)
	}
	if code, _ := post(t, c, srv.URL+"/api/v1/session", good); code != 429 {
		t.Fatalf("right password while locked: %d, want 429", code)
	}
	// That attempt counted: the lockout is now 2×Base.
	clk.add(DefaultThrottle.Base + time.Second)
	if code, _ := post(t, c, srv.URL+"/api/v1/session", good); code != 429 {
		t.Fatalf("after Base: %d, want 429 (backoff doubled)", code)
	}
	clk.add(4*DefaultThrottle.Base + time.Second)
	if code, body := post(t, c, srv.URL+"/api/v1/session", good); code != 201 {
		t.Fatalf("after the lockout: %d %s, want 201", code, body)
	}
}

func TestOnlyLANSourcesAnswered(t *testing.T) {
	h, _, _ := newTestHandler(t)
	for addr, want := range map[string]int{"8.8.8.8:4000": 403, "192.168.1.5:4000": 303, "[2001:db8::5]:1": 403} {
		r := httptest.NewRequest("GET", "/", nil)
		r.RemoteAddr = addr
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != want {
			t.Errorf("GET / from %s: %d, want %d", addr, w.Code, want)
		}
	}
}

// The OpenAPI file documents exactly the API the server registers, with
// the role each operation needs.
func TestOpenAPIMatchesRoutes(t *testing.T) {
	h, _, _ := newTestHandler(t)
	var doc struct {
		Paths map[string]map[string]yaml.Node `yaml:"paths"`
	}
	b, err := os.ReadFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	var documented []string
	for p, ops := range doc.Paths {
		for m, n := range ops {
			if m == "parameters" {
				continue
			}
			var op struct {
				Role string `yaml:"x-role"`
			}
			n.Decode(&op)
			documented = append(documented, strings.ToUpper(m)+" /api/v1"+p+" "+op.Role)
		}
	}
	var served []string
	for _, p := range h.patterns {
		if strings.Contains(p, " /api/") {
			served = append(served, p)
		}
	}
	slices.Sort(documented)
	slices.Sort(served)
	if d := cmp.Diff(served, documented); d != "" {
		t.Errorf("openapi.yaml vs the routes (-served +documented):\n%s", d)
	}
}

// The setup code and the recovery code printed on the box are the only
// proofs of presence: without one, setup and recovery are refused, and
// the handler has no method that would grant them without a code (a
// button press handed to it would grant them to whichever LAN client
// asked first).
func TestSetupAndRecoveryOnlyWithTheirCode(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	c := srv.Client()
	if code, _ := post(t, c, srv.URL+"/api/v1/setup", `{"user":"root","password":"correct horse battery staple"}`); code != http.StatusForbidden {
		t.Errorf("setup without a code: %d, want 403", code)
	}
	setUpAdmin(t, srv)
	if code, _ := post(t, c, srv.URL+"/api/v1/recover", `{"user":"root","password":"another horse battery staple"}`); code != http.StatusForbidden {
		t.Errorf("recovery without a code: %d, want 403", code)
	}
	ht := reflect.TypeOf(h)
	for i := range ht.NumMethod() {
		if m := ht.Method(i).Name; strings.Contains(strings.ToLower(m), "presence") {
			t.Errorf("Handler.%s: setup and recovery must need their code, nothing else", m)
		}
	}
}

// TestRuleNotInForceIsReported: when the upstream link does not take the
// saved rules (RulesChanged fails), the console's answer says the change
// is not in force, and why (the gateway's error says what applies: the
// previous rules, or the hold), for a saved and for a deleted rule; it used
// to answer success, and the user believed a topic made local had stopped
// leaving the box.
func TestRuleNotInForceIsReported(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	h.SetComponents(Components{RulesChanged: func() error {
		return errors.New("upstream forwarding rules refused: example")
	}})
	c, tok := setUpAdmin(t, srv)
	code, body := post(t, c, srv.URL+"/api/v1/upstream/rules", `{"topic":"devices/+/t/a","action":"local"}`, "X-CSRF-Token", tok)
	if code != http.StatusInternalServerError || !strings.Contains(body, "it is not in force") || !strings.Contains(body, "example") {
		t.Errorf("saving a rule the link does not take: %d %s; want 500 saying it is not in force, and why", code, body)
	}
	rs, err := h.o.Store.ForwardRules()
	if err != nil || len(rs) != 1 {
		t.Fatalf("stored rules %v, %v; want the one saved", rs, err)
	}
	req, _ := http.NewRequest("DELETE", srv.URL+"/api/v1/upstream/rules/"+rs[0].ID, nil)
	req.Header.Set("X-CSRF-Token", tok)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusInternalServerError || !strings.Contains(string(b), "it is not in force") || !strings.Contains(string(b), "example") {
		t.Errorf("deleting a rule the link does not take: %d %s; want 500 saying it is not in force, and why", res.StatusCode, b)
	}
}

func TestRulesAndOptOutChangesAreAnnounced(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	var mu sync.Mutex
	var gotRules [][]string
	var gotOff map[string]bool
	h.SetComponents(Components{
		RulesChanged: func() error {
			rs, err := h.o.Store.ForwardRules()
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			defer mu.Unlock()
			var s []string
			for _, r := range rs {
				s = append(s, r.Topic+" "+r.Action)
			}
			gotRules = append(gotRules, s)
			return nil
		},
		OptOutsChanged: func(m map[string]bool) { mu.Lock(); gotOff = m; mu.Unlock() },
	})
	c, tok := setUpAdmin(t, srv)
	post(t, c, srv.URL+"/api/v1/upstream/rules", `{"topic":"devices/+/t/a","action":"forward"}`, "X-CSRF-Token", tok)
	post(t, c, srv.URL+"/api/v1/upstream/rules", `{"topic":"devices/+/t/a","action":"local"}`, "X-CSRF-Token", tok)
	req, _ := http.NewRequest("PUT", srv.URL+"/api/v1/privacy/optout", strings.NewReader(`{"datum":"device.counters","opt_out":true}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-CSRF-Token", tok)
	if res, err := c.Do(req); err != nil || res.StatusCode != 200 {
		t.Fatalf("opt out: %v %v", res, err)
	} else {
		res.Body.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	if d := cmp.Diff([][]string{{"devices/+/t/a forward"}, {"devices/+/t/a local"}}, gotRules); d != "" {
		t.Errorf("announced rules (-want +got):\n%s", d)
	}
	if d := cmp.Diff(map[string]bool{"device.counters": true}, gotOff); d != "" {
		t.Errorf("announced opt-outs (-want +got):\n%s", d)
	}
}

// A session or API token ended while a request was between reading it
// and touching it (a logout, a recovery, a deletion committing meanwhile)
// stays ended: the touch does not write back the copy it read.
func TestEndedWhileAuthenticatingStaysEnded(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	c, csrfTok := setUpAdmin(t, srv)
	code, body := post(t, c, srv.URL+"/api/v1/tokens", `{"label":"ci"}`, "X-CSRF-Token", csrfTok)
	if code != http.StatusCreated {
		t.Fatalf("create token: %d %s", code, body)
	}
	var tk struct{ ID, Token string }
	if err := json.Unmarshal([]byte(body), &tk); err != nil {
		t.Fatal(err)
	}
	clk.add(2 * time.Minute) // both due a touch
	h.afterAuthRead = func() {
		if err := h.o.Store.DeleteSessions("root", nil); err != nil {
			t.Error(err)
		}
	}
	for i := range 2 {
		if code := get(t, c, srv.URL+"/api/v1/session"); code != http.StatusUnauthorized {
			t.Errorf("session logged out while authenticating, request %d: %d, want 401", i, code)
		}
		h.afterAuthRead = nil
	}
	bearer := func() int {
		req, _ := http.NewRequest("GET", srv.URL+"/api/v1/session", nil)
		req.Header.Set("Authorization", "Bearer "+tk.Token)
		res, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	h.afterAuthRead = func() {
		if err := h.o.Store.DeleteAPIToken(tk.ID, ""); err != nil {
			t.Error(err)
		}
	}
	for i := range 2 {
		if code := bearer(); code != http.StatusUnauthorized {
			t.Errorf("token deleted while authenticating, request %d: %d, want 401", i, code)
		}
		h.afterAuthRead = nil
	}
}

// Of several recoveries with one code at once, one gets it.
func TestRecoveryCodeSpentOnce(t *testing.T) {
	h, srv, _ := newTestHandler(t)
	setUpAdmin(t, srv)
	code, err := h.NewRecoveryCode()
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	start := make(chan struct{})
	oks := make(chan bool, n)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			ok, err := h.checkRecoveryCode(code)
			if err != nil {
				t.Error(err)
			}
			oks <- ok
		}()
	}
	close(start)
	wg.Wait()
	close(oks)
	spent := 0
	for ok := range oks {
		if ok {
			spent++
		}
	}
	if spent != 1 {
		t.Errorf("the recovery code was accepted %d times by %d requests at once, want once", spent, n)
	}
}

// slotGateway is a Gateway with Argon2Slots, counting what is taken.
type slotGateway struct {
	stubGateway
	mu                sync.Mutex
	acquired, release int
	held, maxHeld     int
}

func (g *slotGateway) AcquireArgon2(context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.acquired++
	g.held++
	g.maxHeld = max(g.maxHeld, g.held)
	return nil
}

func (g *slotGateway) ReleaseArgon2() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.release++
	g.held--
}

// The console holds at most one of the box's shared slots at a time, so
// that a flood of logins cannot keep device secret checks waiting until
// they are refused as busy.
func TestConsoleHoldsOneSharedSlot(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	gw := &slotGateway{}
	h, err := NewHandler(Options{Store: st, Gateway: gw})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := h.hash.verify(context.Background(), dummyHash, "correct horse battery staple"); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if gw.acquired != 6 || gw.release != 6 || gw.maxHeld != 1 {
		t.Errorf("6 concurrent checks: shared slots taken %d, given back %d, at most %d at once; want 6, 6, 1", gw.acquired, gw.release, gw.maxHeld)
	}
}

// A Gateway with Argon2Slots bounds the console's argon2id runs with the
// rest of the box's: hashing and checking a password take its slots.
func TestPasswordHashingTakesTheGatewaysSlots(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	gw := &slotGateway{}
	h, err := NewHandler(Options{Store: st, Gateway: gw})
	if err != nil {
		t.Fatal(err)
	}
	enc, err := h.hash.hash(context.Background(), "correct horse battery staple")
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := h.hash.verify(context.Background(), enc, "correct horse battery staple"); !ok || err != nil {
		t.Fatalf("verify: %v %v", ok, err)
	}
	if gw.acquired != 2 || gw.release != 2 {
		t.Errorf("gateway's slots taken %d and given back %d times for a hash and a check, want 2 and 2", gw.acquired, gw.release)
	}
}

// setUpAdmin runs the first-boot setup on srv and returns a client holding
// the admin session and its CSRF token.
func setUpAdmin(t *testing.T, srv *httptest.Server) (*http.Client, string) {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	c := srv.Client()
	c.Jar = jar
	code, body := post(t, c, srv.URL+"/api/v1/setup", `{"code":"ABCD-EFGH-JKLM-NPQR","user":"root","password":"correct horse battery staple"}`)
	if code != 201 {
		t.Fatalf("setup: %d %s", code, body)
	}
	tok := body[strings.Index(body, `"csrf_token": "`)+15:]
	return c, tok[:strings.IndexByte(tok, '"')]
}

// An erase that fails part-way (here at the retained messages: the stub
// gateway cannot drop them) is audited with what it did before failing.
func TestEraseStoppedIsAudited(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h, err := NewHandler(Options{Store: st, Gateway: stubGateway{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.AddDevice(store.Device{ID: "dev-a", Name: "a", Revoked: true}); err != nil {
		t.Fatal(err)
	}
	if err := h.eraseDevice(context.Background(), &principal{user: "root", remote: "192.0.2.1"}, "dev-a"); !errors.Is(err, errNotAvailable) {
		t.Fatalf("erase = %v, want the gateway's error", err)
	}
	evs, err := st.AuditLog(10, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range evs {
		if e.Action == "privacy.erase" && e.Target == "dev-a" && strings.Contains(e.Detail, "erase stopped: deleting the retained MQTT messages failed") &&
			strings.Contains(e.Detail, "done: revoked, device record and firmware status deleted") {
			return
		}
	}
	t.Errorf("no privacy.erase event says where the erase stopped: %+v", evs)
}

// TestUnreadableRuleShownWithItsID: a forwarding rule record that does not
// decode is listed on the upstream page by its id, with a button that
// deletes it, beside the rules that decode; the API's list names it too.
// Before, the page answered "internal error" and the operator could not
// see which record to delete. So is a record that decodes but whose id is
// empty or not its key: it was listed as a rule with a Delete button for
// its id, which deleted nothing.
func TestUnreadableRuleShownWithItsID(t *testing.T) {
	for name, raw := range map[string]string{
		"not json":   "{not json",
		"empty id":   `{"id":"","topic":"devices/+/t/x","action":"local"}`,
		"another id": `{"id":"r7","topic":"devices/+/t/x","action":"local"}`,
	} {
		t.Run(name, func(t *testing.T) {
			_, srv := handlerWithRuleRecord(t, "r99", raw)
			c, tok := setUpAdmin(t, srv)
			read := func(method, path string) (int, string) {
				t.Helper()
				req, _ := http.NewRequest(method, srv.URL+path, nil)
				req.Header.Set("X-CSRF-Token", tok)
				res, err := c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer res.Body.Close()
				b, _ := io.ReadAll(res.Body)
				return res.StatusCode, string(b)
			}
			code, page := read("GET", "/upstream")
			for _, want := range []string{`record <code>r99</code>`, `action="/upstream/rules/r99/delete"`, `forwarding rule record &#34;r99&#34; in the store does not decode`, "/t/kept</code>"} {
				if code != http.StatusOK || !strings.Contains(page, want) {
					t.Errorf("upstream page: %d, want 200 showing %q:\n%s", code, want, page)
				}
			}
			if code, body := read("GET", "/api/v1/upstream/rules"); code != http.StatusInternalServerError || !strings.Contains(body, `\"r99\"`) {
				t.Errorf("GET /api/v1/upstream/rules: %d %s; want 500 naming r99", code, body)
			}
			if code, body := read("DELETE", "/api/v1/upstream/rules/r99"); code >= 300 {
				t.Fatalf("delete r99: %d %s", code, body)
			}
			if code, body := read("GET", "/api/v1/upstream/rules"); code != http.StatusOK || !strings.Contains(body, "devices/+/t/kept") || strings.Contains(body, "devices/+/t/x") {
				t.Errorf("GET /api/v1/upstream/rules after deleting r99: %d %s; want 200 with the rule kept alone", code, body)
			}
		})
	}
}

// handlerWithRuleRecord serves a console whose store holds a forwarding
// rule that decodes (devices/+/t/kept) and the record raw under key, put
// there past the store's checks, as the disk's corruption or a hand's
// edit would.
func handlerWithRuleRecord(t *testing.T, key, raw string) (*Handler, *httptest.Server) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "s.db")
	st, err := store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.PutForwardRule(store.ForwardRule{Topic: "devices/+/t/kept", Action: "forward"}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("forward_rules")).Put([]byte(key), []byte(raw))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	st, err = store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	h, err := NewHandler(Options{Store: st, Gateway: stubGateway{code: "ABCD-EFGH-JKLM-NPQR"}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(SecurityHeaders(h))
	t.Cleanup(srv.Close)
	return h, srv
}

// TestRulesChangedWhileUnreadable: with a forwarding rule record that does
// not decode, saving or deleting another rule still tells the gateway,
// which then puts the hold in force (here: says so), and the answer says
// the change is not in force. The console read the rules back first and,
// failing, never told the gateway: the link stayed on its previous rules,
// which may forward what the saved rule keeps local.
func TestRulesChangedWhileUnreadable(t *testing.T) {
	h, srv := handlerWithRuleRecord(t, "r99", "{not json")
	var calls atomic.Int32
	h.SetComponents(Components{RulesChanged: func() error {
		calls.Add(1)
		return errors.New("the upstream link holds (example)")
	}})
	c, tok := setUpAdmin(t, srv)
	code, body := post(t, c, srv.URL+"/api/v1/upstream/rules", `{"topic":"devices/+/t/a","action":"local"}`, "X-CSRF-Token", tok)
	if n := calls.Load(); n != 1 {
		t.Errorf("RulesChanged called %d times on saving a rule beside a bad record, want 1", n)
	}
	if code != http.StatusInternalServerError || !strings.Contains(body, "it is not in force") || !strings.Contains(body, "holds (example)") {
		t.Errorf("saving a rule beside a bad record: %d %s; want 500 saying it is not in force, with the gateway's reason", code, body)
	}
	req, _ := http.NewRequest("DELETE", srv.URL+"/api/v1/upstream/rules/r1", nil)
	req.Header.Set("X-CSRF-Token", tok)
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if n := calls.Load(); n != 2 || res.StatusCode != http.StatusInternalServerError {
		t.Errorf("deleting a rule beside a bad record: %d, RulesChanged called %d times in all; want 500, 2", res.StatusCode, n)
	}
}

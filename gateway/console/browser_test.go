package console_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/bastion-iot/bastion/internal/testenv"
)

// screenshotDir is where the test saves its screenshots. Set
// BASTION_SCREENSHOTS=docs to refresh the committed ones in docs/screenshots.
func screenshotDir(t *testing.T) string {
	if os.Getenv("BASTION_SCREENSHOTS") == "docs" {
		d, _ := filepath.Abs("../../docs/screenshots")
		os.MkdirAll(d, 0o755)
		return d
	}
	return t.TempDir()
}

// verifyChain checks in Go, independently of the browser, that the console
// serves a chain that verifies against the gateway's root for the name the
// browser uses.
func verifyChain(t *testing.T, b *box) {
	t.Helper()
	addr := strings.TrimPrefix(b.base, "https://")
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: b.g.CA().RootPool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("console chain does not verify against the root: %v", err)
	}
	defer conn.Close()
	st := conn.ConnectionState()
	chains := st.VerifiedChains
	if len(chains) == 0 || !chains[0][len(chains[0])-1].Equal(b.g.CA().Root()) {
		t.Fatalf("verified chain does not end at the gateway root")
	}
	// And a client that trusts only the system roots refuses it.
	if c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "127.0.0.1"}); err == nil {
		c.Close()
		t.Fatal("console chain verified against an empty root pool")
	}
}

// nssHome makes a HOME whose NSS database (the one Chromium reads on Linux)
// trusts the gateway's root as a CA, so the browser verifies the console's
// certificate itself: no --ignore-certificate-errors.
func nssHome(t *testing.T, b *box) string {
	certutil := testenv.RequireCommand(t, "certutil")
	home := t.TempDir()
	db := filepath.Join(home, ".pki", "nssdb")
	os.MkdirAll(db, 0o700)
	run := func(args ...string) {
		out, err := exec.Command(certutil, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("certutil %v: %v\n%s", args, err, out)
		}
	}
	run("-N", "-d", "sql:"+db, "--empty-password")
	run("-A", "-d", "sql:"+db, "-n", "bastion-test-root", "-t", "C,,", "-i", filepath.Join(b.dir, "pki", "root.crt"))
	return home
}

// newBrowser starts headless Chromium with a fresh profile and HOME (whose
// NSS database decides which roots it trusts). It closes with the test.
func newBrowser(t *testing.T, chromium, home string) context.Context {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium),
		chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun, chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Env("HOME=" + home),
		chromedp.WindowSize(1280, 900),
	}
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelB := chromedp.NewContext(actx)
	t.Cleanup(func() { cancelB(); cancelA() })
	return ctx
}

// Without our root in its NSS database the browser refuses the console:
// proof that the main test's browser trusts it through that database and
// not through some bypass.
func TestBrowserRefusesConsoleWithoutTheRoot(t *testing.T) {
	chromium := testenv.RequireCommand(t, "chromium")
	b := startBox(t)
	ctx := newBrowser(t, chromium, t.TempDir())
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	err := chromedp.Do(sctx, chromedp.Navigate(b.base+"/login"))
	if err == nil || !strings.Contains(err.Error(), "ERR_CERT_AUTHORITY_INVALID") {
		t.Fatalf("navigate without the root trusted: %v, want net::ERR_CERT_AUTHORITY_INVALID", err)
	}
}

func TestBrowserConsoleFlow(t *testing.T) {
	chromium := testenv.RequireCommand(t, "chromium")
	b := startBox(t)
	verifyChain(t, b)
	home := nssHome(t, b)
	shots := screenshotDir(t)

	ctx := newBrowser(t, chromium, home)
	// Start the browser, then listen: confirm() dialogs are accepted, and
	// every console message is kept (CSP violations show up there).
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var consoleMsgs []string
	dialogs := chromedp.Events(ctx, page.JavascriptDialogOpening)
	msgs := chromedp.Console(ctx)
	wg.Add(2)
	go func() {
		defer wg.Done()
		for ev, err := range dialogs {
			if err != nil {
				return
			}
			mu.Lock()
			consoleMsgs = append(consoleMsgs, "dialog: "+ev.Message)
			mu.Unlock()
			chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: true})
		}
	}()
	go func() {
		defer wg.Done()
		for m, err := range msgs {
			if err != nil {
				return
			}
			mu.Lock()
			consoleMsgs = append(consoleMsgs, m.Text)
			mu.Unlock()
		}
	}()
	defer func() {
		chromedp.Cancel(ctx)
		wg.Wait()
	}()

	// Each step has its own deadline, so a stuck step still leaves the tab
	// open to say where it is.
	step := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 30*time.Second) }
	do := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, cancel := step()
		defer cancel()
		if err := chromedp.Do(sctx, actions...); err != nil {
			dctx, cancel := step()
			defer cancel()
			loc, _ := chromedp.Run(dctx, chromedp.Location())
			body, _ := chromedp.Run(dctx, chromedp.Text(chromedp.CSS("body")))
			t.Fatalf("%s: %v (at %s)\n%s", what, err, loc, body)
		}
	}
	// submit clicks a form's button and waits for the page it leads to.
	submit := func(id string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, _ *chromedp.Target) error {
			_, err := chromedp.Run(ctx, chromedp.WaitEvent(page.LoadEventFired, nil, chromedp.Click(chromedp.ID(id))))
			return err
		})
	}
	text := func(sel string) string {
		t.Helper()
		sctx, cancel := step()
		defer cancel()
		s, err := chromedp.Run(sctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return s
	}
	eval := func(js string) bool {
		t.Helper()
		sctx, cancel := step()
		defer cancel()
		v, err := chromedp.Run(sctx, chromedp.Evaluate[bool](js))
		if err != nil {
			t.Fatalf("evaluate %s: %v", js, err)
		}
		return v
	}
	shot := func(name string) {
		t.Helper()
		sctx, cancel := step()
		defer cancel()
		png, err := chromedp.Run(sctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot %s: %v", name, err)
		}
		if len(png) < 1000 || string(png[1:4]) != "PNG" {
			t.Fatalf("screenshot %s: %d bytes, not a PNG", name, len(png))
		}
		if err := os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// The browser reaches the console over TLS, trusting only our root, and
	// is sent to the first-admin setup.
	do("open the console", chromedp.Navigate(b.base+"/"), chromedp.WaitVisible(chromedp.ID("code")))
	if loc, _ := chromedp.Run(ctx, chromedp.Location()); loc != b.base+"/setup" {
		t.Fatalf("first visit landed on %s, want /setup", loc)
	}
	shot("setup")

	// A weak password is refused by the server even with the right code.
	do("weak password",
		chromedp.SetValue(chromedp.ID("code"), b.code), chromedp.SetValue(chromedp.ID("user"), "root"),
		chromedp.SetValue(chromedp.ID("password"), "Password1234"), chromedp.SetValue(chromedp.ID("password2"), "Password1234"),
		submit("create"), chromedp.WaitVisible(chromedp.CSS("p.error")))
	if s := text("p.error"); !strings.Contains(s, "too common") {
		t.Errorf("weak password page says %q", s)
	}

	// First admin with the setup code.
	do("setup", chromedp.Navigate(b.base+"/setup"), chromedp.WaitVisible(chromedp.ID("code")),
		chromedp.SendKeys(chromedp.ID("code"), strings.ToLower(b.code)), chromedp.SendKeys(chromedp.ID("user"), "root"),
		chromedp.SendKeys(chromedp.ID("password"), goodPassword), chromedp.SendKeys(chromedp.ID("password2"), goodPassword),
		submit("create"), chromedp.WaitVisible(chromedp.CSS("section.alarms")))

	// Log out and in again.
	do("logout", submit("logout"), chromedp.WaitVisible(chromedp.ID("login")))
	do("login", chromedp.SendKeys(chromedp.ID("user"), "root"), chromedp.SendKeys(chromedp.ID("password"), goodPassword),
		submit("login"), chromedp.WaitVisible(chromedp.CSS("section.alarms")))
	if !strings.Contains(text("header"), "root (admin)") {
		t.Errorf("header after login: %q", text("header"))
	}
	// The session cookie is HttpOnly: page script cannot read it.
	if eval(`document.cookie.includes("bastion")`) {
		t.Error("document.cookie exposes a console cookie")
	}
	shot("dashboard")

	// Pair by setup code, up to the window state.
	do("pairing", chromedp.Navigate(b.base+"/pairing"), chromedp.WaitVisible(chromedp.ID("pair-name")),
		chromedp.SendKeys(chromedp.ID("pair-name"), "kitchen sensor"), chromedp.SendKeys(chromedp.ID("pair-code"), "3497-0112-332"),
		submit("pair-add"), chromedp.WaitVisible(chromedp.CSS("p.flash")))
	if s := text("p.flash"); !strings.Contains(s, "next pairing window") {
		t.Errorf("after adding by code: %q", s)
	}
	if s := text("#expected"); !strings.Contains(s, "kitchen sensor") {
		t.Errorf("expected devices: %q", s)
	}
	if s := text("#window-state"); !strings.Contains(s, "Closed") {
		t.Errorf("window state: %q", s)
	}
	if eval(`document.body.innerText.includes("3497-0112-332")`) {
		t.Error("the pairing page shows the setup code back")
	}
	if es, _ := b.g.Store().ExpectedDevices(); len(es) != 1 || es[0].Code != "3497-0112-332" || es[0].Name != "kitchen sensor" {
		t.Errorf("store has expected devices %+v", es)
	}
	shot("pairing")

	// Pre-provision a device whose name is an XSS attempt.
	evil := `<img src=x onerror=window.__xss=1><script>__xss=2</script>`
	do("issue credentials", chromedp.Navigate(b.base+"/devices"), chromedp.WaitVisible(chromedp.ID("new-name")),
		chromedp.SetValue(chromedp.ID("new-name"), evil), chromedp.SetValue(chromedp.ID("new-auth"), "psk"),
		submit("issue"), chromedp.WaitVisible(chromedp.ID("credentials")))
	if s := text("#credentials"); !strings.Contains(s, "PSK identity") {
		t.Errorf("credentials page: %q", s)
	}
	do("add a second device", chromedp.Navigate(b.base+"/devices"), chromedp.WaitVisible(chromedp.ID("new-name")),
		chromedp.SetValue(chromedp.ID("new-name"), "hall lamp"), chromedp.SetValue(chromedp.ID("new-auth"), "secret"),
		submit("issue"), chromedp.WaitVisible(chromedp.ID("credentials")))
	do("devices list", chromedp.Navigate(b.base+"/devices"), chromedp.WaitVisible(chromedp.ID("devices")))
	if !eval(`window.__xss === undefined`) {
		t.Error("XSS in a device name ran in the browser")
	}
	if !eval(`document.querySelectorAll("#devices img, #devices script").length === 0`) {
		t.Error("the device name became elements in the DOM")
	}
	if !eval(`Array.from(document.querySelectorAll("#devices .dev-name")).some(a => a.textContent === ` + jsString(evil) + `)`) {
		t.Error("the device name is not shown as text")
	}
	shot("devices")
	do("search", chromedp.SetValue(chromedp.ID("q"), "lamp"), chromedp.Submit(chromedp.ID("q")), chromedp.WaitVisible(chromedp.ID("devices")))
	if !eval(`document.querySelectorAll("#devices .dev-name").length === 1 && document.querySelector("#devices .dev-name").textContent === "hall lamp"`) {
		t.Errorf("search for lamp shows: %q", text("#devices"))
	}

	// Open the device, rename it, revoke it (through the confirm dialog).
	do("device detail", chromedp.Click(chromedp.CSS("#devices .dev-name")), chromedp.WaitVisible(chromedp.ID("device")))
	do("rename", chromedp.SetValue(chromedp.ID("rename-name"), "hall lamp 2"), submit("rename"),
		chromedp.WaitVisible(chromedp.CSS("p.flash")))
	if s := text("#device-name"); s != "hall lamp 2" {
		t.Errorf("name after rename: %q", s)
	}
	do("revoke", submit("revoke"), chromedp.WaitVisible(chromedp.CSS("p.flash")))
	if s := text("#device-state"); !strings.Contains(s, "revoked") {
		t.Errorf("state after revoke: %q", s)
	}
	shot("device")
	devs, _ := b.g.Store().Devices()
	revoked := 0
	for _, d := range devs {
		if d.Revoked {
			revoked++
			if d.Name != "hall lamp 2" {
				t.Errorf("revoked %q, want hall lamp 2", d.Name)
			}
		}
	}
	if revoked != 1 {
		t.Errorf("%d devices revoked, want 1", revoked)
	}

	// Change a forwarding rule.
	do("add rule", chromedp.Navigate(b.base+"/upstream"), chromedp.WaitVisible(chromedp.ID("rule-topic")),
		chromedp.SetValue(chromedp.ID("rule-topic"), "devices/+/t/temperature"), chromedp.SetValue(chromedp.ID("rule-action"), "forward"),
		submit("rule-save"), chromedp.WaitVisible(chromedp.CSS("p.flash")))
	do("change rule", chromedp.SetValue(chromedp.ID("rule-topic"), "devices/+/t/temperature"), chromedp.SetValue(chromedp.ID("rule-action"), "redact"),
		chromedp.SetValue(chromedp.ID("rule-fields"), "location, owner"), submit("rule-save"), chromedp.WaitVisible(chromedp.CSS("p.flash")))
	if s := text("#rules tbody"); !strings.Contains(s, "redact") || strings.Contains(s, "forward") || !strings.Contains(s, "location, owner") {
		t.Errorf("rules table after the change: %q", s)
	}
	if rs, _ := b.g.Store().ForwardRules(); len(rs) != 1 || rs[0].Action != "redact" || strings.Join(rs[0].Fields, ",") != "location,owner" {
		t.Errorf("rules in the store: %+v", rs)
	}
	shot("upstream")

	for _, p := range []string{"privacy", "firmware", "firewall", "admins", "audit"} {
		do(p, chromedp.Navigate(b.base+"/"+p), chromedp.WaitVisible(chromedp.CSS("main h1")))
		shot(p)
	}
	if s := text("main"); !strings.Contains(s, "device.revoke") || !strings.Contains(s, "upstream.rule") || !strings.Contains(s, "console.login") {
		t.Errorf("audit page lacks the actions just made: %.500q", s)
	}
	// In --dev the gateway does not manage the firewall: the page shows the
	// policy and the plan it would apply.
	do("firewall", chromedp.Navigate(b.base+"/firewall"), chromedp.WaitVisible(chromedp.CSS("main pre")))
	if s := text("main"); !strings.Contains(s, "not applied") || !strings.Contains(s, "bastion:default-drop") {
		t.Errorf("firewall page lacks the plan: %.500q", s)
	}

	// Usable on a phone: nothing wider than the screen.
	do("phone", chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2), chromedp.EmulateMobile),
		chromedp.Navigate(b.base+"/"), chromedp.WaitVisible(chromedp.CSS("section.alarms")))
	if !eval(`document.documentElement.scrollWidth <= window.innerWidth + 1`) {
		t.Error("the dashboard scrolls sideways on a 390 px phone screen")
	}
	shot("dashboard-phone")
	do("desktop", chromedp.EmulateViewport(1280, 900))

	// Log out: the page is gone and the old session does not come back.
	do("logout", chromedp.Navigate(b.base+"/"), chromedp.WaitVisible(chromedp.ID("logout")),
		submit("logout"), chromedp.WaitVisible(chromedp.ID("login")))
	do("after logout", chromedp.Navigate(b.base+"/devices"), chromedp.WaitVisible(chromedp.ID("login")))

	mu.Lock()
	defer mu.Unlock()
	for _, m := range consoleMsgs {
		if strings.Contains(m, "Content Security Policy") || strings.Contains(m, "Refused to") {
			t.Errorf("browser console: %s", m)
		}
	}
	dialogsSeen := 0
	for _, m := range consoleMsgs {
		if strings.HasPrefix(m, "dialog: Revoke this device?") {
			dialogsSeen++
		}
	}
	if dialogsSeen != 1 {
		t.Errorf("saw %d revoke confirmations, want 1 (app.js not loaded?): %q", dialogsSeen, consoleMsgs)
	}
}

func jsString(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`, "<", `\x3c`)
	return `"` + r.Replace(s) + `"`
}

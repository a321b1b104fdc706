package gateway

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// expiredClient writes a client certificate from ca that expired an hour
// ago, and its key, as files.
func expiredClient(t *testing.T, ca *testpki.CA, cn string) (certFile, keyFile string) {
	t.Helper()
	l := ca.ClientValid(t, cn, time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour))
	return l.CertFile, l.KeyFile
}

// expiredGateway is a dev gateway whose upstream link's client certificate
// has expired (the broker is not there either: the link only retries), with
// a firewall on in-memory tables that the gateway manages, and
// upstream.gateway "bastion" beside gateway_id "bastion-dev", as a file
// written by an older --write-default-config says.
type expiredGateway struct {
	*running
	path string
	ca   *testpki.CA
	v4   *firewall.Fake
	log  *logbuf.Buffer
}

func startExpiredGateway(t *testing.T) *expiredGateway {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	e := &expiredGateway{path: filepath.Join(dir, "bastion.yaml"), ca: testpki.New(t, t.TempDir(), "cloud"), v4: firewall.NewFake(firewall.IPv4), log: &logbuf.Buffer{}}
	cfg := testConfig(dir)
	cfg.Upstream.Enabled = true
	cfg.Upstream.Config = upstream.Config{
		Broker: "mqtts://127.0.0.1:1", CAFile: e.ca.CertFile, Gateway: "bastion",
		BackoffMin: time.Second, BackoffMax: time.Minute,
		Forward: []upstream.Rule{{Topic: "devices/+/t/#", Action: "forward"}},
	}
	cfg.Upstream.CertFile, cfg.Upstream.KeyFile = expiredClient(t, e.ca, "gw-expired")
	if err := WriteConfigFile(e.path, cfg); err != nil {
		t.Fatal(err)
	}
	g, err := New(Options{Dev: true, StateDir: dir, Out: &bytes.Buffer{},
		Log: slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	fw, err := firewall.New(e.v4, firewall.NewFake(firewall.IPv6), discard, g.metrics.reg)
	if err != nil {
		t.Fatal(err)
	}
	c := g.Config()
	p, err := c.FirewallPolicy()
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Apply(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	g.fw = fw
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	g.opts.Ready = func(*Gateway) { close(ready) }
	e.running = &running{g: g, cancel: cancel, done: make(chan error, 1)}
	go func() { e.done <- g.Run(ctx) }()
	select {
	case <-ready:
	case err := <-e.done:
		t.Fatalf("gateway stopped at start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("gateway not ready within 10s")
	}
	t.Cleanup(func() {
		e.stop(t)
		if t.Failed() {
			t.Logf("gateway log:\n%s", e.log.String())
		}
	})
	return e
}

// edit rewrites the configuration file with each regexp replaced.
func (e *expiredGateway) edit(t *testing.T, repl ...string) {
	t.Helper()
	b, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(repl); i += 2 {
		re := regexp.MustCompile(repl[i])
		if !re.Match(b) {
			t.Fatalf("the config file has no %q:\n%s", repl[i], b)
		}
		b = re.ReplaceAll(b, []byte(repl[i+1]))
	}
	if err := os.WriteFile(e.path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (e *expiredGateway) tables(t *testing.T) firewall.Table {
	t.Helper()
	tb, err := e.v4.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tb
}

// TestReloadWithExpiredCertInUse: the upstream client certificate has
// expired (or a box without a real-time clock is reloaded before NTP set
// the clock). A reload that leaves it as it is applies the rest, here a log
// level: the link used to refuse every reload over the certificate it was
// already using, with the log level, pairing, firmware and rule changes in
// it. The start-up and the reload also warn of upstream.gateway "bastion".
func TestReloadWithExpiredCertInUse(t *testing.T) {
	e := startExpiredGateway(t)
	const warn = `upstream.gateway: is \"bastion\" while gateway_id is \"bastion-dev\"` // as the text log quotes it
	if !strings.Contains(e.log.String(), warn) {
		t.Errorf("the start-up log does not warn %q", warn)
	}
	e.edit(t, `level: info`, `level: debug`)
	if err := e.g.Reload(); err != nil {
		t.Fatalf("reload with the expired certificate in use, unchanged, and a log level change: %v", err)
	}
	if l := e.g.Config().Log.Level; l != "debug" {
		t.Errorf("log level %q after the reload, want debug", l)
	}
	if e.g.level.Level() != slog.LevelDebug {
		t.Errorf("the logger's level is %v after the reload, want debug", e.g.level.Level())
	}
	if n := strings.Count(e.log.String(), warn); n != 2 {
		t.Errorf("the warning logged %d times, want 2 (start-up and reload)", n)
	}
	if !strings.Contains(e.log.String(), "the reload keeps it, as it did not change it") {
		t.Errorf("the log does not say the expired certificate in use is kept")
	}
}

// TestReloadRefusedAppliesNothing: a reload whose new client certificate
// has expired is refused by the upstream link. It also changes the firewall
// policy and the log level: neither may be applied (the firewall's new
// policy used to be in force before the link refused, beside the old
// configuration). The same changes with the certificate in use are
// applied, firewall included.
func TestReloadRefusedAppliesNothing(t *testing.T) {
	e := startExpiredGateway(t)
	before := e.tables(t)
	good, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	cert, key := expiredClient(t, e.ca, "gw-other")
	e.edit(t, `level: info`, `level: debug`, `(?m)^  ping: .*$`, `  ping: []`,
		`cert_file: ".*"`, `cert_file: "`+cert+`"`, `key_file: ".*"`, `key_file: "`+key+`"`)
	err = e.g.Reload()
	if err == nil || !strings.Contains(err.Error(), "upstream.cert_file "+cert) || !strings.Contains(err.Error(), "expired at") {
		t.Fatalf("reload with a new, expired client certificate: %v; want the upstream link's refusal", err)
	}
	if d := cmp.Diff(before, e.tables(t)); d != "" {
		t.Errorf("a refused reload changed the firewall (-before +after):\n%s", d)
	}
	if l := e.g.Config().Log.Level; l != "info" {
		t.Errorf("log level %q after a refused reload, want info", l)
	}

	if err := os.WriteFile(e.path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	e.edit(t, `level: info`, `level: debug`, `(?m)^  ping: .*$`, `  ping: []`)
	if err := e.g.Reload(); err != nil {
		t.Fatalf("the same changes with the certificate in use: %v", err)
	}
	if cmp.Equal(before, e.tables(t)) {
		t.Errorf("the firewall change was not applied by the accepted reload (the test's change shows nothing)")
	}
	if l := e.g.Config().Log.Level; l != "debug" {
		t.Errorf("log level %q after the accepted reload, want debug", l)
	}
}

// rewriteConfig writes g's configuration file anew: the running
// configuration with change made to it.
func rewriteConfig(t *testing.T, g *Gateway, change func(*config.Config)) {
	t.Helper()
	c := g.Config()
	change(&c)
	if err := WriteConfigFile(g.configPath, c); err != nil {
		t.Fatal(err)
	}
}

// lastReloadDetail is the detail of the newest config.reload audit event.
func lastReloadDetail(t *testing.T, g *Gateway) string {
	t.Helper()
	es, err := g.Store().AuditLog(1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Action == "config.reload" {
			return e.Detail
		}
	}
	t.Fatal("no config.reload in the audit log")
	return ""
}

// TestReloadListenerChangeKeepsPorts: listeners move only at a restart, so
// a reload that changes mqtt.listen and console.listen leaves the firewall
// as it is (before, the policy was built from the new file and applied at
// once: the ports the running listeners use were closed, and the new
// ones, on which nothing listens, opened), keeps the running values in the
// configuration, and says the keys wait for a restart, in the log and the
// audit.
func TestReloadListenerChangeKeepsPorts(t *testing.T) {
	e := startExpiredGateway(t)
	before := e.tables(t)
	running := e.g.Config()
	rewriteConfig(t, e.g, func(c *config.Config) {
		c.MQTT.Listen = "127.0.0.1:18883"
		c.Console.Listen = "127.0.0.1:18443"
	})
	if err := e.g.Reload(); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(before, e.tables(t)); d != "" {
		t.Errorf("a reload that changes listeners changed the firewall (-before +after):\n%s", d)
	}
	if got := e.g.Config(); got.MQTT.Listen != running.MQTT.Listen || got.Console.Listen != running.Console.Listen {
		t.Errorf("after the reload the configuration says mqtt.listen %q, console.listen %q; want the running %q, %q",
			got.MQTT.Listen, got.Console.Listen, running.MQTT.Listen, running.Console.Listen)
	}
	const want = "take effect at the next restart: mqtt.listen, console.listen"
	if d := lastReloadDetail(t, e.g); d != want {
		t.Errorf("config.reload audit detail %q, want %q", d, want)
	}
	if !strings.Contains(e.log.String(), want) {
		t.Errorf("the log does not say %q", want)
	}
}

// TestReloadRestartOnlyKeys: a reload applies the log level, and keeps the
// running values of firmware.check_interval, metrics.listen and
// gateway_id, which only a restart puts in force (the firmware cache, the
// metrics listener and the CA are built at start), naming them. Before,
// the configuration, and so the status, said the new values.
func TestReloadRestartOnlyKeys(t *testing.T) {
	e := startExpiredGateway(t)
	running := e.g.Config()
	rewriteConfig(t, e.g, func(c *config.Config) {
		c.Log.Level = "debug"
		c.Firmware.CheckInterval = config.Duration(time.Hour)
		c.Metrics.Listen = "127.0.0.1:19100"
		c.GatewayID = "bastion-other"
	})
	if err := e.g.Reload(); err != nil {
		t.Fatal(err)
	}
	got := e.g.Config()
	if got.Log.Level != "debug" || e.g.level.Level() != slog.LevelDebug {
		t.Errorf("log level %q (logger %v) after the reload, want debug", got.Log.Level, e.g.level.Level())
	}
	if got.Firmware.CheckInterval != running.Firmware.CheckInterval || got.Metrics.Listen != running.Metrics.Listen {
		t.Errorf("after the reload: firmware.check_interval %v, metrics.listen %q; want the running %v, %q",
			got.Firmware.CheckInterval.D(), got.Metrics.Listen, running.Firmware.CheckInterval.D(), running.Metrics.Listen)
	}
	if id := e.g.Status().GatewayID; id != running.GatewayID {
		t.Errorf("status gateway_id %q after the reload, want the running %q", id, running.GatewayID)
	}
	const want = "take effect at the next restart: gateway_id, metrics.listen, firmware.check_interval"
	if d := lastReloadDetail(t, e.g); d != want {
		t.Errorf("config.reload audit detail %q, want %q", d, want)
	}
	if !strings.Contains(e.log.String(), want) {
		t.Errorf("the log does not say %q", want)
	}
}

// TestReloadRemovesVendorRoot: an operator removes a compromised vendor
// root from pairing.vendors and reloads. From then on no IDevID of that
// vendor enrolls: not a session the window in progress accepted before
// the reload, not a new one in that window, not one in the next window.
// Before, the roots were read only at start: the reload said "config
// reloaded" and the root stayed trusted. Putting the root back works at
// once too.
func TestReloadRemovesVendorRoot(t *testing.T) {
	acmeRoot, acmeDev := vendorCA(t, "acme")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	if err := os.WriteFile(rootFile, acmeRoot, 0o644); err != nil {
		t.Fatal(err)
	}
	g := startPairing(t, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addr := g.g.Addrs()["coaps"]
	roots := g.g.CA().RootPool()
	refused := func() float64 { return testutil.ToFloat64(g.g.pairing.refused.WithLabelValues("unknown vendor")) }

	g.press(t, 1500*time.Millisecond)
	accepted, err := devicesim.DialIDevID(ctx, addr, acmeDev, roots)
	if err != nil {
		t.Fatalf("the acme IDevID's session, before the reload: %v", err)
	}
	defer accepted.Close()
	rewriteConfig(t, g.g, func(c *config.Config) { c.Pairing.Vendors = nil })
	if err := g.g.Reload(); err != nil {
		t.Fatal(err)
	}
	if d := lastReloadDetail(t, g.g); d != "" {
		t.Errorf("config.reload audit detail %q, want none: pairing.vendors takes effect at once", d)
	}
	if _, err := accepted.EnrollEST(ctx); err == nil {
		t.Fatal("a session accepted before the reload enrolled after its vendor root was removed")
	}
	n := refused()
	if _, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots); err == nil {
		t.Fatal("the acme IDevID enrolled in the open window after its vendor root was removed")
	}
	if refused() <= n {
		t.Errorf("refused{unknown vendor} = %v, want more than %v: refused for its vendor", refused(), n)
	}
	g.press(t, 11*time.Second) // cancel
	g.pclock.Advance(time.Second)
	g.press(t, 1500*time.Millisecond)
	if !g.g.pairing.win.IsOpen() {
		t.Fatal("the next window did not open")
	}
	n = refused()
	if _, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots); err == nil {
		t.Fatal("the acme IDevID enrolled in the next window after its vendor root was removed")
	}
	if refused() <= n {
		t.Errorf("refused{unknown vendor} = %v, want more than %v: refused for its vendor", refused(), n)
	}

	rewriteConfig(t, g.g, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} })
	if err := g.g.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, err := devicesim.PairIDevID(ctx, addr, acmeDev, roots); err != nil {
		t.Fatalf("the acme IDevID after its root was put back: %v", err)
	}
}

// TestReloadESTListenAtRestart: pairing.est_listen takes effect at the
// next restart. A reload that turns it off keeps EST on its running
// address, and says so. Before, the reload stored "", and the next window
// had EST listen on every address, on a random port, which the firewall
// then opened on the lan.
func TestReloadESTListenAtRestart(t *testing.T) {
	acmeRoot, _ := vendorCA(t, "acme")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	if err := os.WriteFile(rootFile, acmeRoot, 0o644); err != nil {
		t.Fatal(err)
	}
	g := startPairing(t, func(c *config.Config) {
		c.Pairing.Vendors = map[string]string{"acme": rootFile}
		c.Pairing.ESTListen = "127.0.0.1:0"
	})
	rewriteConfig(t, g.g, func(c *config.Config) { c.Pairing.ESTListen = "" })
	if err := g.g.Reload(); err != nil {
		t.Fatal(err)
	}
	const want = "take effect at the next restart: pairing.est_listen"
	if d := lastReloadDetail(t, g.g); d != want {
		t.Errorf("config.reload audit detail %q, want %q", d, want)
	}
	if !strings.Contains(g.log.String(), want) {
		t.Errorf("the log does not say %q", want)
	}
	if l := g.g.Config().Pairing.ESTListen; l != "127.0.0.1:0" {
		t.Errorf("pairing.est_listen %q after the reload, want the running 127.0.0.1:0", l)
	}
	g.press(t, 1500*time.Millisecond)
	waitFor(t, "EST over HTTPS opens with the window", func() bool { return g.g.pairing.ESTAddr() != "" })
	if host, _, err := net.SplitHostPort(g.g.pairing.ESTAddr()); err != nil || host != "127.0.0.1" {
		t.Errorf("EST over HTTPS listens at %s, want 127.0.0.1 as the gateway started with", g.g.pairing.ESTAddr())
	}
}

// TestListenESTNeverEmpty: EST is never opened on "", which tls.Listen
// takes for every address and a random port.
func TestListenESTNeverEmpty(t *testing.T) {
	g := startPairing(t, nil)
	if ln, err := g.g.pairing.listenEST(); err == nil {
		ln.Close()
		t.Fatalf("listenEST with pairing.est_listen \"\" listened at %s", ln.Addr())
	}
}

// TestLiveConfigGatewayID: gateway_id takes effect at the next restart, and
// so do the upstream id and client id derived from it (a file that leaves
// them ""), while the link's other keys are applied: before, the link took
// the new derived ids at once, its topics moving while the gateway still
// reported and used the old gateway_id.
func TestLiveConfigGatewayID(t *testing.T) {
	running := config.Dev("/tmp/x")
	running.Upstream.Enabled = true
	file := running
	file.GatewayID, file.Upstream.Gateway, file.Upstream.ClientID = "gw-new", "", ""
	file.Upstream.KeepAlive = time.Minute
	config.SetDefaults(&file)
	if file.Upstream.Gateway != "gw-new" || file.Upstream.ClientID != "gw-new" {
		t.Fatalf("the test's file derives upstream.gateway %q, client_id %q; want gw-new", file.Upstream.Gateway, file.Upstream.ClientID)
	}
	got := liveConfig(running, file, true)
	if got.Upstream.Gateway != running.Upstream.Gateway || got.Upstream.ClientID != running.Upstream.ClientID || got.Upstream.KeepAlive != time.Minute {
		t.Errorf("upstream gateway %q, client_id %q, keepalive %v; want the running %q, %q and the file's 1m",
			got.Upstream.Gateway, got.Upstream.ClientID, got.Upstream.KeepAlive, running.Upstream.Gateway, running.Upstream.ClientID)
	}
	want := []string{"gateway_id", "upstream.gateway", "upstream.client_id"}
	if d := cmp.Diff(want, config.ChangedKeys(got, file)); d != "" {
		t.Errorf("keys named (-want +got):\n%s", d)
	}
}

package gateway

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/firewall"
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

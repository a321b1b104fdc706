package gateway

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/config"
)

// tablesFor is the IPv4 filter table that the policy of cfg, with extra,
// makes on an empty one.
func tablesFor(t *testing.T, cfg config.Config, extra ...firewall.Service) string {
	t.Helper()
	v4 := firewall.NewFake(firewall.IPv4)
	fw, err := firewall.New(v4, firewall.NewFake(firewall.IPv6), discard, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	p, err := cfg.FirewallPolicy(extra...)
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Apply(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	return v4.Save()
}

// A reload (SIGHUP) that comes while the EST port goes into the firewall
// policy (the pairing window opens) or out of it (the window closes) ends
// with the kernel enforcing the new file's policy, the EST port in it
// exactly while its listener is up. The test runs the reload at the worst
// moment: as the window opens, after estFirewall built its policy from the
// configuration and before that policy is applied; as it closes, after
// the policy without the port is applied and before estFirewall returns.
// When nothing holds reloadMu there the reload runs right then; when
// estFirewall holds it the reload waits its turn. Before, the first left
// the old file's policy in force (built before the reload, applied after
// it) while the gateway held the new file, and the second left the EST
// port open after the window had closed (the reload still saw its
// address), each until the next reload.
func TestReloadDuringESTFirewallChange(t *testing.T) {
	acmeRoot, _ := vendorCA(t, "acme")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	if err := os.WriteFile(rootFile, acmeRoot, 0o644); err != nil {
		t.Fatal(err)
	}
	v4 := firewall.NewFake(firewall.IPv4)
	var (
		mu     sync.Mutex
		around func(apply func() error) error // the next estFirewall apply's
	)
	applied := make(chan struct{}, 1)
	g := startPairingWith(t, func(c *config.Config) {
		c.Pairing.Vendors = map[string]string{"acme": rootFile}
		c.Pairing.ESTListen = "127.0.0.1:0"
	}, func(g *Gateway) {
		fw, err := firewall.New(v4, firewall.NewFake(firewall.IPv6), discard, g.metrics.reg)
		if err != nil {
			t.Fatal(err)
		}
		cfg := g.Config()
		p, err := cfg.FirewallPolicy()
		if err != nil {
			t.Fatal(err)
		}
		if err := fw.Apply(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		g.fw = fw
		g.pairing.applyPolicy = func(ctx context.Context, p firewall.Policy) error {
			mu.Lock()
			a := around
			around = nil
			mu.Unlock()
			apply := func() error { return fw.Apply(ctx, p) }
			if a == nil {
				return apply()
			}
			defer func() { applied <- struct{}{} }()
			return a(apply)
		}
	})
	arm := func(a func(apply func() error) error) {
		mu.Lock()
		around = a
		mu.Unlock()
	}
	reloaded := make(chan error, 1)
	reload := func() {
		if g.g.reloadMu.TryLock() {
			// Nothing holds reloadMu around estFirewall's apply: the
			// reload runs here, in between.
			g.g.reloadMu.Unlock()
			reloaded <- g.g.Reload()
			return
		}
		go func() { reloaded <- g.g.Reload() }()
	}
	// both waits for the armed apply and the reload it ran.
	both := func(t *testing.T) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for _, c := range []string{"apply", "reload"} {
			select {
			case <-applied:
			case err := <-reloaded:
				if err != nil {
					t.Fatalf("reload: %v", err)
				}
			case <-timeout:
				t.Fatalf("%s: not within 10s", c)
			}
		}
	}
	rate := regexp.MustCompile(`handshake_rate: "[^"]*"`)
	setRate := func(t *testing.T, r string) {
		t.Helper()
		path := filepath.Join(g.dir, "bastion.yaml")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !rate.Match(b) {
			t.Fatalf("%s has no handshake_rate:\n%s", path, b)
		}
		if err := os.WriteFile(path, rate.ReplaceAll(b, []byte(`handshake_rate: "`+r+`"`)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	reloadedTo := func(t *testing.T, r string) config.Config {
		t.Helper()
		cfg := g.g.Config()
		if cfg.Firewall.HandshakeRate != r {
			t.Fatalf("firewall.handshake_rate %q after the reload, want %q", cfg.Firewall.HandshakeRate, r)
		}
		return cfg
	}

	// The window opens: the reload comes between estFirewall's reading of
	// the configuration and its apply.
	setRate(t, "7/second burst 14")
	arm(func(apply func() error) error {
		reload()
		return apply()
	})
	g.press(t, 1500*time.Millisecond)
	both(t)
	cfg := reloadedTo(t, "7/second burst 14")
	est := g.g.pairing.firewallExtra()
	if len(est) != 1 {
		t.Fatalf("EST services in the policy while the window is open: %+v, want 1", est)
	}
	if diff := cmp.Diff(tablesFor(t, cfg, est...), v4.Save()); diff != "" {
		t.Errorf("a reload as the window opened: the kernel does not enforce the new file's policy with the EST port (-want +got):\n%s", diff)
	}

	// The window closes: the reload comes after estFirewall applied the
	// policy without the EST port. Its address must be gone by then: a
	// reload that still saw it would put the port back (when estFirewall
	// holds reloadMu, the reload waits and so may come after it is gone
	// anyway; hence the check).
	setRate(t, "9/second burst 18")
	arm(func(apply func() error) error {
		if a := g.g.pairing.ESTAddr(); a != "" {
			t.Errorf("the EST port is taken out of the firewall while its address %s is still published", a)
		}
		err := apply()
		reload()
		return err
	})
	g.press(t, 11*time.Second) // cancels the window
	both(t)
	waitFor(t, "EST over HTTPS closes with the window", func() bool { return g.g.pairing.ESTAddr() == "" })
	cfg = reloadedTo(t, "9/second burst 18")
	if diff := cmp.Diff(tablesFor(t, cfg), v4.Save()); diff != "" {
		t.Errorf("a reload as the window closed: the kernel does not enforce the new file's policy without the EST port (-want +got):\n%s", diff)
	}
}

package gateway

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/firewall"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/testenv"
	tnetns "github.com/bastion-iot/bastion/internal/testutil/netns"
)

// bastionctl firewall remove (POST /v1/firewall/remove) takes out the rules
// an earlier run with firewall.manage: true left, also when bastiond now
// runs with manage: false (here --dev, which never manages). It made its
// Firewall with no prometheus registerer, which firewall.New refuses, so it
// always failed. Real iptables, in a namespace the test made; twice, as
// each remove registers its counters on a registry of its own.
func TestFirewallRemoveUnmanaged(t *testing.T) {
	testenv.RequireRoot(t)
	for _, c := range []string{"ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"} {
		testenv.RequireCommand(t, c)
	}
	ns := tnetns.New(t, "fwrm")
	dir := filepath.Join(t.TempDir(), "state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(dir)
	if cfg.Firewall.Manage {
		t.Fatal("the test configuration manages the firewall; this test is about manage: false")
	}
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The rules an earlier run with manage: true left in the namespace.
	v4, v6, err := firewall.NewIPTables(firewall.InNetns(ns.Name))
	if err != nil {
		t.Fatal(err)
	}
	earlier, err := firewall.New(v4, v6, discard, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	pol, err := cfg.FirewallPolicy()
	if err != nil {
		t.Fatal(err)
	}
	if err := earlier.Apply(ctx, pol); err != nil {
		t.Fatal(err)
	}
	saved := func() string {
		return ns.MustRun("iptables-save", "-t", "filter") + ns.MustRun("ip6tables-save", "-t", "filter")
	}
	if s := saved(); !strings.Contains(s, "BASTION") {
		t.Fatalf("no Bastion rules in the namespace after the earlier run's apply:\n%s", s)
	}

	g, err := New(Options{Dev: true, StateDir: dir, Log: discard, Out: &strings.Builder{}})
	if err != nil {
		t.Fatal(err)
	}
	g.iptablesOpts = []firewall.IPTablesOption{firewall.InNetns(ns.Name)}
	r := runGatewayFrom(t, g, 10*time.Second)
	defer r.stop(t)
	if g.fw != nil {
		t.Fatal("the gateway manages the firewall; this test is about manage: false")
	}
	c := control.New(control.SocketPath(dir))
	for i := 1; i <= 2; i++ {
		var out struct {
			Removed bool `json:"removed"`
		}
		if _, err := c.Do(ctx, "POST", "/v1/firewall/remove", nil, &out); err != nil || !out.Removed {
			t.Fatalf("remove %d with manage: false: %+v %v, want removed", i, out, err)
		}
		if s := saved(); strings.Contains(s, "BASTION") || strings.Contains(strings.ToLower(s), "bastion:") {
			t.Fatalf("Bastion rules left in the namespace after remove %d:\n%s", i, s)
		}
	}
	ev, err := g.Store().AuditLog(10, 0)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ev {
		if e.Action == "firewall.remove" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("firewall.remove audited %d times, want 2: %+v", n, ev)
	}
}

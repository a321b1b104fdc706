package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/firewall"
)

// TestFirewallDriftOnConsole: a rule deleted behind the gateway's back is
// repaired by the firewall's reconcile, listed on the console's firewall
// page and written to the audit log as firewall.drift.
func TestFirewallDriftOnConsole(t *testing.T) {
	v4 := firewall.NewFake(firewall.IPv4)
	recorded := make(chan firewall.DriftEvent, 1)
	g := startPairingWith(t, nil, func(g *Gateway) {
		// What openFirewall passes, with a hook that tells the test; the
		// first reconcile runs as the gateway starts, the next in an hour.
		opts := append(g.firewallOptions(), firewall.WithInterval(time.Hour), firewall.WithDriftHook(func(e firewall.DriftEvent) {
			g.auditDrift(e)
			recorded <- e
		}))
		fw, err := firewall.New(v4, firewall.NewFake(firewall.IPv6), discard, g.metrics.reg, opts...)
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
		// Someone deletes Bastion's jump from INPUT.
		snap, err := v4.Snapshot(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := v4.Tamper(firewall.Op{Kind: firewall.OpDelete, Chain: "INPUT", Rule: snap.Rules["INPUT"][0].Rule}); err != nil {
			t.Fatal(err)
		}
		g.fw = fw
	})
	select {
	case e := <-recorded:
		if e.Err != "" {
			t.Fatalf("repair failed: %s", e.Err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no drift event within 10s of the gateway's start")
	}
	snap, err := v4.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if in := snap.Rules["INPUT"]; len(in) == 0 || !strings.HasPrefix(in[0].Rule.Target(), "BASTION-") {
		t.Fatalf("INPUT not repaired: %v", in)
	}

	rep, err := consoleFirewall{g.g}.Show(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var rows [][]string
	for _, s := range rep.Sections {
		if strings.HasPrefix(s.Title, "Drift events") {
			rows = s.Table
		}
	}
	if len(rows) != 1 || rows[0][1] != firewall.IPv4.String() || !strings.Contains(rows[0][2], "repaired: jump_missing: INPUT has no jump") {
		t.Errorf("console drift events %q: want the repaired IPv4 jump; report %+v", rows, rep)
	}

	evs, err := g.g.Store().AuditLog(50, 0)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range evs {
		found = found || e.Action == "firewall.drift" && e.Actor == "firewall" && e.Target == firewall.IPv4.String() && strings.Contains(e.Detail, "jump_missing")
	}
	if !found {
		t.Errorf("audit log %+v: want a firewall.drift event for IPv4", evs)
	}
}

package gateway

import (
	"context"
	"errors"
	"strings"
	"sync"
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

// TestFirewallRepairFailedAlarm: a repair of drift that fails (the IPv4
// backend refuses every commit) raises an alarm in the console's firewall
// page, which the dashboard shows, until a later reconcile repairs the
// rules. It was only logged and listed among the drift events.
func TestFirewallRepairFailedAlarm(t *testing.T) {
	v4 := firewall.NewFake(firewall.IPv4)
	var (
		mu      sync.Mutex
		last    *firewall.DriftEvent
		changed = make(chan struct{}, 1)
	)
	g := startPairingWith(t, nil, func(g *Gateway) {
		// Reconciles follow each other quickly, so that the test sees a
		// failed repair and then a good one; the hook keeps the newest
		// event for the test without holding the firewall up.
		opts := append(g.firewallOptions(), firewall.WithInterval(20*time.Millisecond), firewall.WithDriftHook(func(e firewall.DriftEvent) {
			g.auditDrift(e)
			mu.Lock()
			last = &e
			mu.Unlock()
			select {
			case changed <- struct{}{}:
			default:
			}
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
		snap, err := v4.Snapshot(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := v4.Tamper(firewall.Op{Kind: firewall.OpDelete, Chain: "INPUT", Rule: snap.Rules["INPUT"][0].Rule}); err != nil {
			t.Fatal(err)
		}
		v4.FailCommits(errors.New("iptables-restore: the test's kernel refuses"))
		g.fw = fw
	})
	// newest waits until the newest drift event is a failed repair, or a
	// good one.
	newest := func(failed bool) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			mu.Lock()
			e := last
			mu.Unlock()
			if e != nil && (e.Err != "") == failed {
				return
			}
			select {
			case <-changed:
			case <-deadline:
				t.Fatalf("the newest drift event is not a repair that failed %v within 10s: %+v", failed, e)
			}
		}
	}
	alarm := func() string {
		t.Helper()
		rep, err := consoleFirewall{g.g}.Show(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var alarms []string
		for _, s := range rep.Sections {
			if s.Alarm != "" {
				alarms = append(alarms, s.Alarm)
			}
		}
		return strings.Join(alarms, " | ")
	}

	newest(true)
	if a := alarm(); !strings.Contains(a, "the last repair of drifted rules failed ("+firewall.IPv4.String()+" at ") || !strings.Contains(a, "the test's kernel refuses") {
		t.Errorf("firewall alarm %q after a failed repair; want it naming the IPv4 family and why", a)
	}
	// The repair fails at every reconcile, 20 ms apart: audited once
	// (driftAuditEvery), not once a reconcile, which would push every
	// other event out of the bounded audit log.
	for range 5 {
		mu.Lock()
		last = nil
		mu.Unlock()
		newest(true)
	}
	evs, err := g.g.Store().AuditLog(100, 0)
	if err != nil {
		t.Fatal(err)
	}
	drift := 0
	for _, e := range evs {
		if e.Action == "firewall.drift" {
			drift++
		}
	}
	if drift != 1 {
		t.Errorf("%d firewall.drift audit events for one repair failing at 6 reconciles, want 1 (spaced)", drift)
	}
	v4.FailCommits(nil)
	// Repaired, nothing is left to repair: no event follows.
	newest(false)
	if a := alarm(); a != "" {
		t.Errorf("firewall alarm %q after the repair succeeded, want none", a)
	}
}

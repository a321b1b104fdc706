package gateway

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/firewall"
)

// deadlineBackend is a fake backend that records, for each snapshot,
// whether its context had a deadline. The firewall's Run reads it too,
// with the gateway's context, which has none.
type deadlineBackend struct {
	*firewall.Fake
	mu        sync.Mutex
	deadlines []bool
}

func (b *deadlineBackend) Snapshot(ctx context.Context) (firewall.Table, error) {
	_, ok := ctx.Deadline()
	b.mu.Lock()
	b.deadlines = append(b.deadlines, ok)
	b.mu.Unlock()
	return b.Fake.Snapshot(ctx)
}

// take returns the deadlines recorded since the last take.
func (b *deadlineBackend) take() []bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	d := b.deadlines
	b.deadlines = nil
	return d
}

// A reload and the pairing window's EST port give the firewall a deadline:
// both hold reloadMu while it applies, and an iptables run that never
// ends (legacy iptables waiting for an xtables lock another program
// holds) kept it, and with it every later reload and the SIGTERM waiting
// for the reload loop, forever. They gave it context.Background().
func TestFirewallAppliesHaveADeadline(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), testConfig(dir)); err != nil {
		t.Fatal(err)
	}
	g, err := New(Options{Dev: true, StateDir: dir, Log: discard, Out: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	v4 := &deadlineBackend{Fake: firewall.NewFake(firewall.IPv4)}
	if g.fw, err = firewall.New(v4, firewall.NewFake(firewall.IPv6), discard, g.metrics.reg); err != nil {
		t.Fatal(err)
	}
	r := runGatewayFrom(t, g, 10*time.Second)
	t.Cleanup(func() { r.stop(t) })

	if err := g.Reload(); err != nil {
		t.Fatal(err)
	}
	if d := v4.take(); !slices.Contains(d, true) {
		t.Errorf("reload: firewall snapshots with a deadline %v, want one with a deadline", d)
	}
	g.pairing.estFirewall(true)
	if d := v4.take(); !slices.Contains(d, true) {
		t.Errorf("EST port: firewall snapshots with a deadline %v, want one with a deadline", d)
	}
}

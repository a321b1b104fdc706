package firewall

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// gatewayPolicy is the default Bastion policy: CoAPS, MQTT/TLS and the
// console on lan, nothing on wan.
func gatewayPolicy(lan, wan string) Policy {
	return Policy{
		Zones: []Zone{{Name: ZoneLAN, Interfaces: []string{lan}}, {Name: ZoneWAN, Interfaces: []string{wan}}},
		Services: []Service{
			{Name: "coaps", Proto: UDP, Port: 5684, Zones: []string{ZoneLAN}, Handshake: true},
			{Name: "mqtt-tls", Proto: TCP, Port: 8883, Zones: []string{ZoneLAN}, Handshake: true},
			{Name: "console", Proto: TCP, Port: 8443, Zones: []string{ZoneLAN}},
		},
		HandshakeRate: Rate{Count: 20, Per: time.Second, Burst: 40},
		Ping:          []string{ZoneLAN},
	}
}

type fakeEnv struct {
	v4, v6 *Fake
	fw     *Firewall
	reg    *prometheus.Registry
}

func newFakeEnv(t *testing.T) *fakeEnv {
	t.Helper()
	e := &fakeEnv{v4: NewFake(IPv4), v6: NewFake(IPv6), reg: prometheus.NewRegistry()}
	fw, err := New(e.v4, e.v6, discard(), e.reg, WithInterval(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	e.fw = fw
	return e
}

func (e *fakeEnv) drift(fam Family, kind string) float64 {
	return testutil.ToFloat64(e.fw.m.drift.WithLabelValues(fam.String(), kind))
}

// checkEnforced verifies the fake holds exactly the planned chains, each
// behind one jump at the top of its hook, and nothing else of Bastion's.
func checkEnforced(t *testing.T, fk *Fake, rs Ruleset) {
	t.Helper()
	ctx := context.Background()
	l, err := readLive(ctx, fk)
	if err != nil {
		t.Fatal(err)
	}
	want := rs.Chains(fk.Family())
	if len(l.chains) != len(want) {
		t.Errorf("%s: %d Bastion chains, want %d: %v", fk.Family(), len(l.chains), len(want), l.names)
	}
	for _, c := range want {
		hook := l.hooks[c.Hook]
		if len(hook) == 0 || !isOurJump(hook[0].Rule) {
			t.Fatalf("%s: %s does not start with Bastion's jump: %v", fk.Family(), c.Hook, hook)
		}
		n := 0
		for _, r := range hook {
			if isOurJump(r.Rule) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: %s has %d Bastion jumps, want 1", fk.Family(), c.Hook, n)
		}
		got := rulesOf(l.chains[hook[0].Rule.Target()])
		if diff := cmp.Diff(c.Rules, got); diff != "" {
			t.Errorf("%s: chain behind %s (-want +got):\n%s", fk.Family(), c.Hook, diff)
		}
	}
}

func TestApplyIsIdempotent(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	p := gatewayPolicy("eth1", "eth0")
	if err := e.fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	rs, _ := Plan(p)
	checkEnforced(t, e.v4, rs)
	checkEnforced(t, e.v6, rs)
	if e.v4.Commits() != 1 || e.v6.Commits() != 1 {
		t.Fatalf("first apply: commits v4=%d v6=%d, want 1 each (one transaction per family)", e.v4.Commits(), e.v6.Commits())
	}
	before4, before6 := e.v4.Save(), e.v6.Save()
	if err := e.fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	if e.v4.Commits() != 1 || e.v6.Commits() != 1 {
		t.Errorf("second apply committed: v4=%d v6=%d, want no new transaction", e.v4.Commits(), e.v6.Commits())
	}
	if diff := cmp.Diff(before4, e.v4.Save()); diff != "" {
		t.Errorf("v4 changed by second apply (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(before6, e.v6.Save()); diff != "" {
		t.Errorf("v6 changed by second apply (-want +got):\n%s", diff)
	}
	d, err := e.fw.Diff(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if want := "iptables: no changes\nip6tables: no changes\n"; d != want {
		t.Errorf("Diff after apply = %q, want %q", d, want)
	}
	// A fresh Firewall (bastiond restarted) sees the same rules as its own.
	fw2, err := New(e.v4, e.v6, discard(), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	if err := fw2.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	if e.v4.Commits() != 1 || e.v6.Commits() != 1 {
		t.Errorf("apply after restart committed: v4=%d v6=%d", e.v4.Commits(), e.v6.Commits())
	}
}

func TestApplySwapsToNewPolicyAndRemovesOldChains(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a := gatewayPolicy("eth1", "eth0")
	b := a
	b.Services = append([]Service{{Name: "est", Proto: UDP, Port: 5685, Zones: []string{ZoneLAN}, Handshake: true}}, a.Services[:2]...)
	for i, p := range []Policy{a, b, a, b} {
		if err := e.fw.Apply(ctx, p); err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
		rs, _ := Plan(p)
		checkEnforced(t, e.v4, rs)
		checkEnforced(t, e.v6, rs)
	}
	if got := e.v4.Commits(); got != 4 {
		t.Errorf("v4 commits = %d, want 4 (one per changed apply)", got)
	}
	// Policy changes are not drift.
	for _, k := range []string{"chain_modified", "stale_chain", "jump_missing"} {
		if v := e.drift(IPv4, k); v != 0 {
			t.Errorf("drift %s = %v after plain applies", k, v)
		}
	}
}

// commitHook is the fake of one family with a hook run before each
// Commit, for failures that depend on the moment (the other family's
// state, the caller's context).
type commitHook struct {
	*Fake
	before func(ctx context.Context) error // nil, or a non-nil error fails the Commit
}

func (h *commitHook) Commit(ctx context.Context, ops []Op) error {
	if h.before != nil {
		if err := h.before(ctx); err != nil {
			return err
		}
	}
	return h.Fake.Commit(ctx, ops)
}

func newHookedEnv(t *testing.T) (*fakeEnv, *commitHook) {
	t.Helper()
	e := &fakeEnv{v4: NewFake(IPv4), v6: NewFake(IPv6), reg: prometheus.NewRegistry()}
	h := &commitHook{Fake: e.v6}
	fw, err := New(e.v4, h, discard(), e.reg)
	if err != nil {
		t.Fatal(err)
	}
	e.fw = fw
	return e, h
}

func (e *fakeEnv) commits(fam Family, reason string) float64 {
	return testutil.ToFloat64(e.fw.m.commits.WithLabelValues(fam.String(), reason))
}

func (e *fakeEnv) errs(fam Family, op string) float64 {
	return testutil.ToFloat64(e.fw.m.errors.WithLabelValues(fam.String(), op))
}

// reloadPair is a policy and a reload of it that closes the console.
func reloadPair() (a, b Policy, ra, rb Ruleset) {
	a = gatewayPolicy("eth1", "eth0")
	b = a
	b.Services = a.Services[:2]
	ra, _ = Plan(a)
	rb, _ = Plan(b)
	return a, b, ra, rb
}

// checkStable fails if a reconcile changes anything: the policy Run keeps
// in place is the one the kernel already enforces.
func checkStable(t *testing.T, e *fakeEnv) {
	t.Helper()
	c4, c6 := e.v4.Commits(), e.v6.Commits()
	if err := e.fw.reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.v4.Commits() != c4 || e.v6.Commits() != c6 {
		t.Error("reconcile changed the tables: Run keeps a policy other than the one in force")
	}
}

func TestApplyFailureRollsBackCommittedFamily(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a, b, ra, _ := reloadPair()
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	before6 := e.v6.Save()
	no := errors.New("kernel says no")
	e.v6.FailCommits(no)
	err := e.fw.Apply(ctx, b)
	if !errors.Is(err, no) {
		t.Fatalf("apply with failing v6 = %v, want the commit error", err)
	}
	if !strings.Contains(err.Error(), "iptables rolled back to what it enforced before") {
		t.Errorf("apply error does not tell of the rollback: %v", err)
	}
	// When Apply returns, not after a drift repair: IPv4 is on a again.
	checkEnforced(t, e.v4, ra)
	if diff := cmp.Diff(before6, e.v6.Save()); diff != "" {
		t.Errorf("failed transaction changed v6 (-want +got):\n%s", diff)
	}
	for _, c := range []struct {
		name string
		got  float64
		want float64
	}{
		{"transactions{iptables,apply}", e.commits(IPv4, "apply"), 2},
		{"transactions{iptables,rollback}", e.commits(IPv4, "rollback"), 1},
		{"transactions{ip6tables,rollback}", e.commits(IPv6, "rollback"), 0},
		{"errors{ip6tables,apply}", e.errs(IPv6, "apply"), 1},
		{"errors{ip6tables,cleanup}", e.errs(IPv6, "cleanup"), 0},
		{"errors{iptables,rollback}", e.errs(IPv4, "rollback"), 0},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	e.v6.FailCommits(nil)
	checkStable(t, e)
	checkEnforced(t, e.v6, ra)
}

func TestApplyReadFailureChangesNothing(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a, b, ra, _ := reloadPair()
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	no := errors.New("cannot list")
	e.v6.FailSnapshots(no)
	if err := e.fw.Apply(ctx, b); !errors.Is(err, no) {
		t.Fatalf("apply with unreadable v6 = %v, want the read error", err)
	}
	e.v6.FailSnapshots(nil)
	// Both families are read before either is committed: IPv4 never left a.
	if got := e.v4.Commits(); got != 1 {
		t.Errorf("v4 commits = %d, want 1 (nothing committed once v6 could not be read)", got)
	}
	checkEnforced(t, e.v4, ra)
	if got := e.errs(IPv6, "read"); got != 1 {
		t.Errorf("errors{ip6tables,read} = %v, want 1", got)
	}
	checkStable(t, e)
}

// TestFirstApplyFailureLeavesTablesAsFound: with no previous policy, the
// family already committed goes back to exactly what it had.
func TestFirstApplyFailureLeavesTablesAsFound(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	other := Rule{"-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT"}
	if err := e.v4.Tamper(Op{Kind: OpAppend, Chain: "INPUT", Rule: other}); err != nil {
		t.Fatal(err)
	}
	found4 := e.v4.Save()
	e.v6.FailCommits(errors.New("kernel says no"))
	if err := e.fw.Apply(ctx, gatewayPolicy("eth1", "eth0")); err == nil {
		t.Fatal("first apply with failing v6 succeeded")
	}
	if diff := cmp.Diff(found4, e.v4.Save()); diff != "" {
		t.Errorf("v4 after a failed first apply (-want +got):\n%s", diff)
	}
	if got := e.commits(IPv4, "rollback"); got != 1 {
		t.Errorf("transactions{iptables,rollback} = %v, want 1", got)
	}
	e.v6.FailCommits(nil)
	checkStable(t, e) // nothing to keep in place
}

// TestFirstApplyFailureRestoresEarlierRun: at start-up the rules an
// earlier run left are what the family goes back to, not nothing.
func TestFirstApplyFailureRestoresEarlierRun(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a, b, ra, _ := reloadPair()
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	left4 := e.v4.Save()
	restarted, err := New(e.v4, e.v6, discard(), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	e.v6.FailCommits(errors.New("kernel says no"))
	if err := restarted.Apply(ctx, b); err == nil {
		t.Fatal("apply with failing v6 succeeded")
	}
	checkEnforced(t, e.v4, ra)
	if diff := cmp.Diff(left4, e.v4.Save()); diff != "" {
		t.Errorf("v4 after a failed first apply (-want +got):\n%s", diff)
	}
}

func TestApplyRollbackFailureReportsBoth(t *testing.T) {
	e, h := newHookedEnv(t)
	ctx := context.Background()
	a, b, ra, rb := reloadPair()
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	v6Err, v4Err := errors.New("ip6tables says no"), errors.New("iptables says no now")
	h.before = func(context.Context) error {
		e.v4.FailCommits(v4Err) // the kernel refuses the rollback too
		return v6Err
	}
	err := e.fw.Apply(ctx, b)
	if !errors.Is(err, v6Err) || !errors.Is(err, v4Err) {
		t.Fatalf("apply = %v, want both the v6 and the rollback error", err)
	}
	for _, want := range []string{"rolling iptables back to what it enforced before also failed", "Run's drift repair will put the previous policy back"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("apply error lacks %q: %v", want, err)
		}
	}
	checkEnforced(t, e.v4, rb) // as the error says
	if got := e.errs(IPv4, "rollback"); got != 1 {
		t.Errorf("errors{iptables,rollback} = %v, want 1", got)
	}
	if got := e.commits(IPv4, "rollback"); got != 0 {
		t.Errorf("transactions{iptables,rollback} = %v, want 0", got)
	}
	// Run's repair is the backstop: a is still the policy it keeps.
	h.before = nil
	e.v4.FailCommits(nil)
	if err := e.fw.reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	checkEnforced(t, e.v4, ra)
	checkEnforced(t, e.v6, ra)
}

// TestApplyRollsBackWhenContextEnds: the caller's context ending between
// the families must not stop the rollback.
func TestApplyRollsBackWhenContextEnds(t *testing.T) {
	e, h := newHookedEnv(t)
	a, b, ra, _ := reloadPair()
	if err := e.fw.Apply(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h.before = func(ctx context.Context) error {
		cancel()
		return ctx.Err()
	}
	if err := e.fw.Apply(ctx, b); !errors.Is(err, context.Canceled) {
		t.Fatalf("apply = %v, want context.Canceled", err)
	}
	checkEnforced(t, e.v4, ra)
	if got := e.commits(IPv4, "rollback"); got != 1 {
		t.Errorf("transactions{iptables,rollback} = %v, want 1", got)
	}
}

func TestApplyRefusesInvalidPolicy(t *testing.T) {
	e := newFakeEnv(t)
	p := gatewayPolicy("eth1", "eth0")
	p.Services[0].Zones = []string{ZoneWAN}
	err := e.fw.Apply(context.Background(), p)
	if err == nil || !strings.Contains(err.Error(), "wan zone may never have services") {
		t.Fatalf("Apply(wan service) = %v", err)
	}
	if e.v4.Commits()+e.v6.Commits() != 0 {
		t.Error("an invalid policy reached the kernel")
	}
}

func TestReconcileRepairsDrift(t *testing.T) {
	ctx := context.Background()
	p := gatewayPolicy("eth1", "eth0")
	rs, _ := Plan(p)
	jumpOf := func(t *testing.T, fk *Fake, hook string) Rule {
		t.Helper()
		rules, _ := listRules(fk, hook)
		return rules[0].Rule
	}
	cases := []struct {
		name   string
		fam    Family
		tamper func(t *testing.T, fk *Fake) error
		kind   string
	}{
		{"jump deleted", IPv4, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpDelete, Chain: "INPUT", Rule: jumpOf(t, fk, "INPUT")})
		}, "jump_missing"},
		{"forward jump deleted v6", IPv6, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpDelete, Chain: "FORWARD", Rule: jumpOf(t, fk, "FORWARD")})
		}, "jump_missing"},
		{"accept inserted above jump", IPv4, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpInsert, Chain: "INPUT", Pos: 1, Rule: Rule{"-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT"}})
		}, "jump_moved"},
		{"duplicate jump", IPv6, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpAppend, Chain: "INPUT", Rule: jumpOf(t, fk, "INPUT")})
		}, "jump_duplicate"},
		{"chain flushed", IPv4, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpFlush, Chain: jumpOf(t, fk, "INPUT").Target()})
		}, "chain_modified"},
		{"rule deleted from chain", IPv6, func(t *testing.T, fk *Fake) error {
			c := jumpOf(t, fk, "INPUT").Target()
			rules, _ := listRules(fk, c)
			return fk.Tamper(Op{Kind: OpDelete, Chain: c, Rule: rules[len(rules)-1].Rule})
		}, "chain_modified"},
		{"rule added to chain", IPv4, func(t *testing.T, fk *Fake) error {
			c := jumpOf(t, fk, "FORWARD").Target()
			return fk.Tamper(Op{Kind: OpInsert, Chain: c, Pos: 1, Rule: Rule{"-j", "ACCEPT"}})
		}, "chain_modified"},
		{"jump comment changed", IPv4, func(t *testing.T, fk *Fake) error {
			j := jumpOf(t, fk, "INPUT")
			return fk.Tamper(Op{Kind: OpDelete, Chain: "INPUT", Rule: j},
				Op{Kind: OpInsert, Chain: "INPUT", Pos: 1, Rule: Rule{"-j", j.Target()}})
		}, "jump_modified"},
		{"stray chain", IPv6, func(t *testing.T, fk *Fake) error {
			return fk.Tamper(Op{Kind: OpNewChain, Chain: "BASTION-IN-deadbeef"})
		}, "stale_chain"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newFakeEnv(t)
			if err := e.fw.Apply(ctx, p); err != nil {
				t.Fatal(err)
			}
			fk := e.v4
			if tc.fam == IPv6 {
				fk = e.v6
			}
			if err := tc.tamper(t, fk); err != nil {
				t.Fatal(err)
			}
			d, err := e.fw.Diff(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(d, tc.fam.String()+":\n") {
				t.Errorf("Diff does not show the drift in %s:\n%s", tc.fam, d)
			}
			if err := e.fw.reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			checkEnforced(t, e.v4, rs)
			checkEnforced(t, e.v6, rs)
			if got := e.drift(tc.fam, tc.kind); got != 1 {
				t.Errorf("drift counter %s/%s = %v, want 1", tc.fam, tc.kind, got)
			}
			// One event, the family's, naming what was repaired.
			ev := e.fw.Drift()
			if len(ev) != 1 || ev[0].Family != tc.fam || ev[0].Err != "" || ev[0].Time.IsZero() ||
				!slices.ContainsFunc(ev[0].Findings, func(f DriftFinding) bool { return f.Kind == tc.kind && f.Detail != "" }) {
				t.Errorf("drift events %+v: want one repaired in %s with a %s finding", ev, tc.fam, tc.kind)
			}
			// The repair itself is stable.
			c4, c6 := e.v4.Commits(), e.v6.Commits()
			if err := e.fw.reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			if e.v4.Commits() != c4 || e.v6.Commits() != c6 {
				t.Error("second reconcile changed something")
			}
		})
	}
}

// TestDriftEvents: a failed repair is recorded with its error, every event
// reaches the hook, and Drift keeps the last DriftHistory, newest first.
func TestDriftEvents(t *testing.T) {
	ctx := context.Background()
	var hooked []DriftEvent
	v4, v6 := NewFake(IPv4), NewFake(IPv6)
	fw, err := New(v4, v6, discard(), prometheus.NewRegistry(), WithDriftHook(func(e DriftEvent) { hooked = append(hooked, e) }))
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Apply(ctx, gatewayPolicy("eth1", "eth0")); err != nil {
		t.Fatal(err)
	}
	deleteJump := func() {
		t.Helper()
		rules, _ := listRules(v6, "INPUT")
		if err := v6.Tamper(Op{Kind: OpDelete, Chain: "INPUT", Rule: rules[0].Rule}); err != nil {
			t.Fatal(err)
		}
	}
	deleteJump()
	v6.FailCommits(errors.New("xtables lock held"))
	if err := fw.reconcile(ctx); err == nil {
		t.Fatal("reconcile with failing commits: no error")
	}
	v6.FailCommits(nil)
	ev := fw.Drift()
	if len(ev) != 1 || ev[0].Family != IPv6 || !strings.Contains(ev[0].Err, "xtables lock held") {
		t.Fatalf("drift events %+v: want one failed repair in ipv6", ev)
	}
	for range DriftHistory + 3 {
		if err := fw.reconcile(ctx); err != nil {
			t.Fatal(err)
		}
		deleteJump()
	}
	ev = fw.Drift()
	if len(ev) != DriftHistory {
		t.Fatalf("%d drift events kept, want %d", len(ev), DriftHistory)
	}
	if len(hooked) != DriftHistory+4 {
		t.Errorf("hook saw %d events, want %d", len(hooked), DriftHistory+4)
	}
	// Newest first: the last one hooked is the first listed, and the
	// failed repair has aged out.
	if diff := cmp.Diff(hooked[len(hooked)-1], ev[0]); diff != "" {
		t.Errorf("newest drift event (-want +got):\n%s", diff)
	}
	for _, e := range ev {
		if e.Err != "" {
			t.Errorf("event %+v kept past %d newer ones", e, DriftHistory)
		}
	}
}

func TestRunRepairsUntilCancelled(t *testing.T) {
	e := newFakeEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	p := gatewayPolicy("eth1", "eth0")
	if err := e.fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- e.fw.Run(ctx) }()
	rules, _ := listRules(e.v4, "INPUT")
	if err := e.v4.Tamper(Op{Kind: OpDelete, Chain: "INPUT", Rule: rules[0].Rule}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for e.drift(IPv4, "jump_missing") < 1 {
		if time.Now().After(deadline) {
			t.Fatal("drift not repaired within 10s")
		}
		time.Sleep(5 * time.Millisecond) // polling the repair, not waiting for a server
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v, want nil on cancel", err)
	}
	rs, _ := Plan(p)
	checkEnforced(t, e.v4, rs) // stopping leaves the rules in place
}

func TestRemoveTakesEverythingOutAndStopsRepair(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	empty4, empty6 := e.v4.Save(), e.v6.Save()
	// Another program's rule must survive.
	other := Rule{"-p", "tcp", "-m", "tcp", "--dport", "22", "-j", "ACCEPT"}
	if err := e.v4.Tamper(Op{Kind: OpAppend, Chain: "INPUT", Rule: other}); err != nil {
		t.Fatal(err)
	}
	if err := e.fw.Apply(ctx, gatewayPolicy("eth1", "eth0")); err != nil {
		t.Fatal(err)
	}
	if err := e.fw.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.v4.Tamper(Op{Kind: OpDelete, Chain: "INPUT", Rule: other}); err != nil {
		t.Fatalf("another program's rule is gone: %v", err)
	}
	if diff := cmp.Diff(empty4, e.v4.Save()); diff != "" {
		t.Errorf("v4 after Remove (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(empty6, e.v6.Save()); diff != "" {
		t.Errorf("v6 after Remove (-want +got):\n%s", diff)
	}
	c := e.v4.Commits()
	if err := e.fw.reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if e.v4.Commits() != c {
		t.Error("reconcile after Remove put rules back")
	}
}

func TestCanonicalFormFromKernelIsAccepted(t *testing.T) {
	// An iptables build that prints a rule differently (here: the jump
	// target's options reordered) must not make every reconcile rebuild.
	e := newFakeEnv(t)
	ctx := context.Background()
	p := gatewayPolicy("eth1", "eth0")
	if err := e.fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	// Simulate the kernel spelling: rewrite the chain with the loopback
	// rule spelled "-i lo -j ACCEPT -m comment ...", then teach canon as
	// commit's read-back would have.
	rules, _ := listRules(e.v4, "INPUT")
	name := rules[0].Rule.Target()
	rs, _ := Plan(p)
	c := rs.IPv4[0]
	spelled := rulesOf(mustList(t, e.v4, name))
	spelled[0] = Rule{"-i", "lo", "-m", "comment", "--comment", "bastion:loopback", "-j", "ACCEPT", "-w"}
	e.fw.canon[IPv4][name] = canonChain{content: c.name(0), rules: spelled}
	ops := []Op{{Kind: OpFlush, Chain: name}}
	for _, r := range spelled {
		ops = append(ops, Op{Kind: OpAppend, Chain: name, Rule: r})
	}
	if err := e.v4.Tamper(ops...); err != nil {
		t.Fatal(err)
	}
	n := e.v4.Commits()
	if err := e.fw.reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if e.v4.Commits() != n {
		t.Error("the kernel's own spelling of Bastion's chain was treated as drift")
	}
	// But a real change to it is still drift.
	if err := e.v4.Tamper(Op{Kind: OpDelete, Chain: name, Rule: spelled[1]}); err != nil {
		t.Fatal(err)
	}
	if err := e.fw.reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if e.drift(IPv4, "chain_modified") != 1 {
		t.Error("a deleted rule in a canonicalised chain was not repaired")
	}
}

func listRules(b Backend, chain string) ([]LiveRule, error) {
	t, err := b.Snapshot(context.Background())
	if err != nil {
		return nil, err
	}
	if !slices.Contains(t.Chains, chain) {
		return nil, fmt.Errorf("no chain %s", chain)
	}
	return t.Rules[chain], nil
}

func mustList(t *testing.T, b Backend, chain string) []LiveRule {
	t.Helper()
	r, err := listRules(b, chain)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestDiffShowsRuleLevelChanges(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a := gatewayPolicy("eth1", "eth0")
	d, err := e.fw.Diff(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"iptables:\n  new chain BASTION-IN-", "+ -i eth1 -p tcp -m tcp --dport 8883", "+ -I INPUT 1 -m comment --comment bastion:jump -j BASTION-IN-", "ip6tables:\n"} {
		if !strings.Contains(d, want) {
			t.Errorf("Diff on empty table lacks %q:\n%s", want, d)
		}
	}
	if e.v4.Commits()+e.v6.Commits() != 0 {
		t.Fatal("Diff changed the kernel")
	}
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	b := a
	b.Services = []Service{a.Services[0], a.Services[1]} // console off
	d, err = e.fw.Diff(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	var plus, minus []string
	for _, l := range strings.Split(d, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "+ -i"):
			plus = append(plus, l)
		case strings.HasPrefix(l, "- -i"):
			minus = append(minus, l)
		}
	}
	wantMinus := []string{
		"- -i eth1 -p tcp -m tcp --dport 8443 -m comment --comment bastion:svc:console -j ACCEPT",
		"- -i eth1 -p tcp -m tcp --dport 8443 -m comment --comment bastion:svc:console -j ACCEPT",
	}
	if diff := cmp.Diff(wantMinus, minus); diff != "" {
		t.Errorf("removed rules in Diff (-want +got):\n%s\nfull diff:\n%s", diff, d)
	}
	if len(plus) != 0 {
		t.Errorf("Diff adds rules when only a service was turned off: %v", plus)
	}
}

func TestShowAndDropCounters(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	if err := e.fw.Apply(ctx, gatewayPolicy("eth1", "eth0")); err != nil {
		t.Fatal(err)
	}
	name := mustList(t, e.v4, "INPUT")[0].Rule.Target()
	rules := mustList(t, e.v4, name)
	for i, r := range rules {
		switch r.Rule.Label() {
		case labelDefaultDrop:
			_ = e.v4.Count(name, i, 7, 420)
		case labelRateLimit + "mqtt-tls":
			_ = e.v4.Count(name, i, 3, 180)
		}
	}
	got, err := e.fw.DropCounters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, d := range got {
		if d.Family == IPv4 {
			counts[d.Label] = d.Packets
		}
	}
	want := map[string]uint64{"invalid": 0, "ratelimit:coaps": 0, "ratelimit:mqtt-tls": 3, "default-drop": 7, "fwd-invalid": 0, "fwd-default-drop": 0}
	if diff := cmp.Diff(want, counts); diff != "" {
		t.Errorf("v4 drop counters (-want +got):\n%s", diff)
	}
	if got := testutilCounter(t, e.reg, "bastion_firewall_dropped_packets_total", "iptables", "default-drop"); got != 7 {
		t.Errorf("metric dropped_packets{iptables,default-drop} = %v, want 7", got)
	}
	if got := testutilCounter(t, e.reg, "bastion_firewall_dropped_bytes_total", "iptables", "ratelimit:mqtt-tls"); got != 180 {
		t.Errorf("metric dropped_bytes{iptables,ratelimit:mqtt-tls} = %v, want 180", got)
	}
	s, err := e.fw.Show(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"iptables:\n  INPUT rule 1 -> BASTION-IN-", "default-drop=7", "ratelimit:mqtt-tls=3", "ip6tables:"} {
		if !strings.Contains(s, w) {
			t.Errorf("Show lacks %q:\n%s", w, s)
		}
	}
}

func TestNewRequiresBothFamilies(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(NewFake(IPv4), nil, discard(), reg); err == nil {
		t.Error("New without IPv6 backend succeeded")
	}
	if _, err := New(NewFake(IPv6), NewFake(IPv4), discard(), reg); err == nil {
		t.Error("New with swapped families succeeded")
	}
	if _, err := New(NewFake(IPv4), NewFake(IPv6), discard(), reg); err != nil {
		t.Fatal(err)
	}
	if _, err := New(NewFake(IPv4), NewFake(IPv6), discard(), reg); err == nil {
		t.Error("second New on the same registry succeeded; metrics would collide")
	}
}

// TestSwapIsSafeEvenOpByOp checks the order of a reload's transaction:
// even if the ops took effect one at a time, every hook would start with
// a jump into a complete chain of either the old or the new policy.
func TestSwapIsSafeEvenOpByOp(t *testing.T) {
	ctx := context.Background()
	a := gatewayPolicy("eth1", "eth0")
	b := a
	b.Services = a.Services[1:]
	ra, _ := Plan(a)
	rb, _ := Plan(b)
	for _, fam := range []Family{IPv4, IPv6} {
		e := newFakeEnv(t)
		fk := e.v4
		if fam == IPv6 {
			fk = e.v6
		}
		if err := e.fw.Apply(ctx, a); err != nil {
			t.Fatal(err)
		}
		l, err := readLive(ctx, fk)
		if err != nil {
			t.Fatal(err)
		}
		ch := e.fw.plan(fam, l, rb.Chains(fam))
		ops := append(ch.ops, ch.cleanup...)
		for i, o := range ops {
			if err := fk.Tamper(o); err != nil {
				t.Fatalf("%s op %d %q: %v", fam, i, o.String(), err)
			}
			snap, _ := fk.Snapshot(ctx)
			for k, hook := range []string{"INPUT", "FORWARD"} {
				rules := snap.Rules[hook]
				if len(rules) == 0 || !isOurJump(rules[0].Rule) {
					t.Fatalf("%s after op %d %q: %s does not start with a jump", fam, i, o.String(), hook)
				}
				got := rulesOf(snap.Rules[rules[0].Rule.Target()])
				if !equalRules(got, ra.Chains(fam)[k].Rules) && !equalRules(got, rb.Chains(fam)[k].Rules) {
					t.Fatalf("%s after op %d %q: %s jumps to an incomplete chain (%d rules)", fam, i, o.String(), hook, len(got))
				}
			}
		}
		checkEnforced(t, fk, rb)
	}
}

func TestCleanupBlockedStillSwaps(t *testing.T) {
	e := newFakeEnv(t)
	ctx := context.Background()
	a := gatewayPolicy("eth1", "eth0")
	if err := e.fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	old := mustList(t, e.v4, "INPUT")[0].Rule.Target()
	// Another program jumps into Bastion's chain, so it cannot be deleted.
	if err := e.v4.Tamper(Op{Kind: OpAppend, Chain: "OUTPUT", Rule: Rule{"-j", old}}); err != nil {
		t.Fatal(err)
	}
	b := a
	b.Services = a.Services[:1]
	if err := e.fw.Apply(ctx, b); err != nil {
		t.Fatalf("apply blocked only in cleanup: %v", err)
	}
	rb, _ := Plan(b)
	in := mustList(t, e.v4, "INPUT")
	if got := rulesOf(mustList(t, e.v4, in[0].Rule.Target())); !equalRules(got, rb.IPv4[0].Rules) {
		t.Error("new policy not in force after a blocked cleanup")
	}
	if _, err := listRules(e.v4, old); err != nil {
		t.Errorf("old chain vanished although referenced: %v", err)
	}
	if got := testutil.ToFloat64(e.fw.m.errors.WithLabelValues("iptables", "cleanup")); got != 1 {
		t.Errorf("cleanup errors = %v, want 1", got)
	}
}

package firewall

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultInterval is how often Run checks the kernel for drift. Repair
// happens within one interval plus one transaction, well inside 10 s.
const DefaultInterval = 3 * time.Second

// Firewall keeps both families' filter tables in step with the last
// applied policy. Methods are safe for concurrent use.
type Firewall struct {
	backends []Backend
	log      *slog.Logger
	interval time.Duration
	m        metrics

	mu      sync.Mutex
	desired *Ruleset // last applied ruleset; nil: nothing to keep in place
	// canon remembers how the kernel printed chains Bastion created, for
	// iptables builds that print a rule differently from how Plan writes
	// it; keyed by family and chain name.
	canon map[Family]map[string]canonChain

	// driftMu guards drift alone, so that the console reads it without
	// waiting for a reconcile's iptables runs (which hold mu).
	driftMu sync.Mutex
	drift   []DriftEvent // the last DriftHistory, oldest first
	onDrift func(DriftEvent)
	now     func() time.Time
}

// DriftHistory is how many drift events Drift keeps: enough to see what
// has been changing the rules, bounded however often something does.
const DriftHistory = 32

// DriftEvent is one reconcile that found a family's rules changed by
// something else, and what it did about it.
type DriftEvent struct {
	Time   time.Time
	Family Family
	// Findings say what had changed: kind (jump_missing, jump_moved,
	// jump_modified, jump_duplicate, chain_modified, stale_chain) and
	// detail.
	Findings []DriftFinding
	// Err is why the repair failed ("" when it was repaired): the family
	// still differs from the policy, and the next reconcile tries again.
	Err string
}

// DriftFinding is one way a family's rules differed from the policy.
type DriftFinding struct {
	Kind, Detail string
}

type canonChain struct {
	content string // Chain.name(0) of the desired content it was built from
	rules   []Rule
}

type metrics struct {
	drift   *prometheus.CounterVec
	commits *prometheus.CounterVec
	errors  *prometheus.CounterVec
}

// Option tunes a Firewall.
type Option func(*Firewall)

// WithInterval sets how often Run checks for drift (default DefaultInterval).
func WithInterval(d time.Duration) Option {
	return func(f *Firewall) {
		if d > 0 {
			f.interval = d
		}
	}
}

// WithDriftHook has fn called with every drift event as it is recorded
// (Drift), outside the Firewall's locks: the gateway writes it to its
// audit log.
func WithDriftHook(fn func(DriftEvent)) Option {
	return func(f *Firewall) { f.onDrift = fn }
}

// New returns a Firewall over the IPv4 and IPv6 backends. Both are
// required: managing only one family would leave the other wide open. Its
// counters are registered on reg (bastion_firewall_*).
func New(v4, v6 Backend, log *slog.Logger, reg prometheus.Registerer, opts ...Option) (*Firewall, error) {
	if v4 == nil || v6 == nil || v4.Family() != IPv4 || v6.Family() != IPv6 {
		return nil, errors.New("firewall: need an IPv4 and an IPv6 backend, in that order")
	}
	if log == nil || reg == nil {
		return nil, errors.New("firewall: logger and prometheus registerer are required")
	}
	f := &Firewall{
		backends: []Backend{v4, v6},
		log:      log.With("component", "firewall"),
		interval: DefaultInterval,
		canon:    map[Family]map[string]canonChain{IPv4: {}, IPv6: {}},
		now:      time.Now,
		m: metrics{
			drift: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "bastion_firewall_drift_repaired_total",
				Help: "Changes made to Bastion's firewall rules by something else and undone, by family and kind.",
			}, []string{"family", "kind"}),
			commits: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "bastion_firewall_transactions_total",
				Help: "Firewall transactions committed, by family and reason (apply, rollback, repair, remove).",
			}, []string{"family", "reason"}),
			errors: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "bastion_firewall_errors_total",
				Help: "Failed firewall operations, by family and operation.",
			}, []string{"family", "op"}),
		},
	}
	for _, o := range opts {
		o(f)
	}
	for _, c := range []prometheus.Collector{f.m.drift, f.m.commits, f.m.errors, newDropCollector(f)} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("firewall: register metrics: %w", err)
		}
	}
	return f, nil
}

// live is what the kernel has that concerns Bastion, for one family.
type live struct {
	names  []string              // every chain of the filter table
	hooks  map[string][]LiveRule // INPUT, FORWARD
	chains map[string][]LiveRule // BASTION-* chains
}

func readLive(ctx context.Context, b Backend) (live, error) {
	t, err := b.Snapshot(ctx)
	if err != nil {
		return live{}, err
	}
	l := live{names: t.Chains, hooks: map[string][]LiveRule{}, chains: map[string][]LiveRule{}}
	for _, h := range []string{"INPUT", "FORWARD"} {
		if !slices.Contains(t.Chains, h) {
			return live{}, fmt.Errorf("%s filter table has no %s chain", b.Family(), h)
		}
		l.hooks[h] = t.Rules[h]
	}
	for _, c := range t.Chains {
		if strings.HasPrefix(c, chainPrefix) {
			l.chains[c] = t.Rules[c]
		}
	}
	return l, nil
}

// finding is one way the kernel differs from the desired state.
type finding struct {
	kind   string // jump_missing, jump_moved, jump_modified, jump_duplicate, chain_modified, stale_chain, policy_changed
	detail string
}

// change is what it takes to bring one family to the desired state.
type change struct {
	ops      []Op // one transaction: new chains, then the jump swap
	cleanup  []Op // flush and delete chains no longer jumped to
	findings []finding
	created  map[string]Chain // chains ops create, by name
	text     []string         // human-readable plan
}

func (c change) empty() bool { return len(c.ops) == 0 && len(c.cleanup) == 0 }

func rulesOf(lr []LiveRule) []Rule {
	out := make([]Rule, len(lr))
	for i, r := range lr {
		out[i] = r.Rule
	}
	return out
}

func equalRules(a, b []Rule) bool {
	return slices.EqualFunc(a, b, func(x, y Rule) bool { return slices.Equal(x, y) })
}

// matches reports whether the live chain name holds exactly the desired
// content, as Plan writes it or as the kernel printed it when Bastion
// created that very chain from that very content.
func (f *Firewall) matches(fam Family, name string, lr []LiveRule, want Chain) bool {
	got := rulesOf(lr)
	if equalRules(got, want.Rules) {
		return true
	}
	c, ok := f.canon[fam][name]
	return ok && c.content == want.name(0) && equalRules(got, c.rules)
}

func isOurJump(r Rule) bool { return strings.HasPrefix(r.Target(), chainPrefix) }

// plan computes the change for one family. Callers hold f.mu.
func (f *Firewall) plan(fam Family, l live, want []Chain) change {
	ch := change{created: map[string]Chain{}}
	keep := map[string]bool{}
	for _, c := range want {
		hook := l.hooks[c.Hook]
		current := ""
		if len(hook) > 0 && isOurJump(hook[0].Rule) {
			current = hook[0].Rule.Target()
		}
		target := ""
		if _, ok := l.chains[current]; ok && f.matches(fam, current, l.chains[current], c) {
			target = current
		} else {
			for _, name := range l.names {
				if strings.HasPrefix(name, c.Prefix+"-") && f.matches(fam, name, l.chains[name], c) {
					target = name
					break
				}
			}
		}
		if target == "" {
			for n := 0; ; n++ {
				if name := c.name(n); !slices.Contains(l.names, name) {
					target = name
					break
				}
			}
			ch.created[target] = c
			ch.ops = append(ch.ops, Op{Kind: OpNewChain, Chain: target})
			for _, r := range c.Rules {
				ch.ops = append(ch.ops, Op{Kind: OpAppend, Chain: target, Rule: r})
			}
			var old []string
			if cur, ok := l.chains[current]; ok {
				old = lines(rulesOf(cur))
				ch.findings = append(ch.findings, finding{"chain_modified", fmt.Sprintf("%s no longer holds the planned rules", current)})
				ch.text = append(ch.text, fmt.Sprintf("chain %s replaces %s:", target, current))
			} else {
				ch.text = append(ch.text, fmt.Sprintf("new chain %s:", target))
			}
			for _, d := range lineDiff(old, lines(c.Rules)) {
				ch.text = append(ch.text, "  "+d)
			}
		}
		keep[target] = true

		// Exactly one jump into Bastion's chains, first in the hook.
		jump := jumpRule(target)
		var ours []Rule
		for _, r := range hook {
			if isOurJump(r.Rule) {
				ours = append(ours, r.Rule)
			}
		}
		if len(hook) > 0 && slices.Equal(hook[0].Rule, jump) && len(ours) == 1 {
			continue
		}
		switch {
		case len(ours) == 0:
			ch.findings = append(ch.findings, finding{"jump_missing", fmt.Sprintf("%s has no jump to %s", c.Hook, c.Prefix)})
		case len(ours) > 1:
			ch.findings = append(ch.findings, finding{"jump_duplicate", fmt.Sprintf("%s has %d jumps into Bastion's chains", c.Hook, len(ours))})
		case !isOurJump(hook[0].Rule):
			ch.findings = append(ch.findings, finding{"jump_moved", fmt.Sprintf("%s rule 1 is %q, not Bastion's jump", c.Hook, hook[0].Rule.String())})
		case current == target:
			ch.findings = append(ch.findings, finding{"jump_modified", fmt.Sprintf("%s jump is %q", c.Hook, ours[0].String())})
		}
		// The swap, inside the same transaction as the new chain: insert
		// the new jump first, then delete the old ones, so that even read
		// op by op there is no moment without a jump. Copies identical to
		// the new jump go first (a -D by spec would hit the new one).
		for _, r := range ours {
			if slices.Equal(r, jump) {
				ch.ops = append(ch.ops, Op{Kind: OpDelete, Chain: c.Hook, Rule: r})
				ch.text = append(ch.text, "- -A "+c.Hook+" "+r.String())
			}
		}
		ch.ops = append(ch.ops, Op{Kind: OpInsert, Chain: c.Hook, Pos: 1, Rule: jump})
		ch.text = append(ch.text, "+ -I "+c.Hook+" 1 "+jump.String())
		for _, r := range ours {
			if !slices.Equal(r, jump) {
				ch.ops = append(ch.ops, Op{Kind: OpDelete, Chain: c.Hook, Rule: r})
				ch.text = append(ch.text, "- -A "+c.Hook+" "+r.String())
			}
		}
	}
	// A hook without a desired chain (a rollback to a state that had none)
	// loses its jumps into Bastion's chains, in the same transaction.
	for _, h := range []string{"INPUT", "FORWARD"} {
		if slices.ContainsFunc(want, func(c Chain) bool { return c.Hook == h }) {
			continue
		}
		for _, r := range l.hooks[h] {
			if isOurJump(r.Rule) {
				ch.ops = append(ch.ops, Op{Kind: OpDelete, Chain: h, Rule: r.Rule})
				ch.text = append(ch.text, "- -A "+h+" "+r.Rule.String())
			}
		}
	}
	for _, name := range l.names {
		if strings.HasPrefix(name, chainPrefix) && !keep[name] {
			ch.cleanup = append(ch.cleanup, Op{Kind: OpFlush, Chain: name}, Op{Kind: OpDeleteChain, Chain: name})
			ch.text = append(ch.text, fmt.Sprintf("- chain %s (%d rules)", name, len(l.chains[name])))
			if !ch.createdReplaces(name, l) {
				ch.findings = append(ch.findings, finding{"stale_chain", fmt.Sprintf("chain %s is not in use", name)})
			}
		}
	}
	return ch
}

// createdReplaces reports whether name is a chain this change takes out of
// use (the expected leftover of a swap, not drift by itself).
func (c change) createdReplaces(name string, l live) bool {
	for _, h := range []string{"INPUT", "FORWARD"} {
		for _, r := range l.hooks[h] {
			if r.Rule.Target() == name && len(c.created) > 0 {
				return true
			}
		}
	}
	return false
}

func lines(rs []Rule) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.String()
	}
	return out
}

// lineDiff lists the lines removed from a ("- ") and added in b ("+ "),
// in order, by longest common subsequence; unchanged lines are left out.
func lineDiff(a, b []string) []string {
	n, m := len(a), len(b)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var out []string
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && a[i] == b[j]:
			i, j = i+1, j+1
		case j < m && (i == n || lcs[i][j+1] >= lcs[i+1][j]):
			out = append(out, "+ "+b[j])
			j++
		default:
			out = append(out, "- "+a[i])
			i++
		}
	}
	return out
}

// commit applies ch on b: the main transaction together with the cleanup
// if possible, else the main one alone (a chain someone else still jumps
// to cannot be deleted; that is logged, not fatal). Then it records how
// the kernel printed the chains it created.
func (f *Firewall) commit(ctx context.Context, b Backend, ch change, reason string) error {
	fam := b.Family().String()
	if ch.empty() {
		return nil
	}
	ops := append(slices.Clip(ch.ops), ch.cleanup...)
	err := b.Commit(ctx, ops)
	if err != nil && len(ch.cleanup) > 0 && len(ch.ops) > 0 {
		// Whether the cleanup was what failed shows only when the main
		// transaction then goes through alone; if it fails too, the failure
		// is the change's own, counted under reason, not a cleanup's.
		if err2 := b.Commit(ctx, ch.ops); err2 == nil {
			f.log.Warn("firewall cleanup of old chains failed; applied without it", "family", fam, "err", err)
			f.m.errors.WithLabelValues(fam, "cleanup").Inc()
			ops, err = ch.ops, nil
		} else {
			err = err2
		}
	}
	if err != nil {
		f.m.errors.WithLabelValues(fam, reason).Inc()
		return err
	}
	f.m.commits.WithLabelValues(fam, reason).Inc()
	for _, o := range ops {
		if o.Kind == OpDeleteChain {
			delete(f.canon[b.Family()], o.Chain)
		}
	}
	if len(ch.created) == 0 {
		return nil
	}
	t, err := b.Snapshot(ctx)
	if err != nil {
		f.log.Warn("firewall read-back of new chains failed", "family", fam, "err", err)
		return nil
	}
	for name, c := range ch.created {
		got := rulesOf(t.Rules[name])
		if equalRules(got, c.Rules) {
			continue
		}
		// Accept the kernel's spelling only if it is plausibly the same
		// rules: same count, same comment labels, same targets.
		same := len(got) == len(c.Rules)
		for i := 0; same && i < len(got); i++ {
			same = got[i].Label() == c.Rules[i].Label() && got[i].Target() == c.Rules[i].Target()
		}
		if same {
			f.canon[b.Family()][name] = canonChain{content: c.name(0), rules: got}
		} else {
			f.log.Warn("firewall chain reads back differently from what was written", "family", fam, "chain", name)
		}
	}
	return nil
}

// Apply makes the kernel enforce p on both families and remembers p for
// Run. Applying the policy already in force changes nothing. On error no
// family is left on p: a family already committed when a later one fails
// is rolled back at once (see rollback), and the previous policy stays the
// one Run keeps in place.
func (f *Firewall) Apply(ctx context.Context, p Policy) error {
	rs, err := Plan(p)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Both families are read and planned before either is committed, so a
	// family that cannot be read stops the reload while nothing has changed.
	steps := make([]applyStep, 0, len(f.backends))
	for _, b := range f.backends {
		l, err := readLive(ctx, b)
		if err != nil {
			f.m.errors.WithLabelValues(b.Family().String(), "read").Inc()
			return fmt.Errorf("firewall apply: read %s state: %w", b.Family(), err)
		}
		steps = append(steps, applyStep{b: b, before: l, ch: f.plan(b.Family(), l, rs.Chains(b.Family()))})
	}
	var done []applyStep
	for _, s := range steps {
		if s.ch.empty() {
			f.log.Debug("firewall up to date", "family", s.b.Family().String())
			continue
		}
		if err := f.commit(ctx, s.b, s.ch, "apply"); err != nil {
			return f.rollback(ctx, done, fmt.Errorf("firewall apply %s: %w", s.b.Family(), err))
		}
		f.log.Info("firewall policy applied", "family", s.b.Family().String(), "ops", len(s.ch.ops)+len(s.ch.cleanup))
		done = append(done, s)
	}
	f.desired = &rs
	return nil
}

// applyStep is one family's part of an Apply: what the kernel had when
// Apply read it, and the change to the new policy.
type applyStep struct {
	b      Backend
	before live
	ch     change
}

// rollbackTimeout bounds a rollback, which must not end with the caller's
// context: that ending may be the very reason the later family failed. It
// leaves room for the xtables lock wait (10 s) and two iptables runs.
const rollbackTimeout = 30 * time.Second

// ApplyTimeout is the deadline to give an Apply whose caller has none of
// its own, such as a reload or the pairing window opening a port: callers
// that hold their own locks meanwhile. An Apply runs iptables four times
// (a read and a commit per family), each waiting at most 10 s for the
// xtables lock; it goes past this only when another program keeps that
// lock through several of them, or when a run hangs. It then fails (the
// run under way is killed), after a rollback that has rollbackTimeout of
// its own.
const ApplyTimeout = 30 * time.Second

// rollback is called when cause made a family fail after the families in
// done were committed to the new policy. It puts those back to what they
// enforced before (previous) with the same kind of transaction a reload
// uses, so that both families keep enforcing one policy and the caller,
// told the reload failed, is told the truth. It returns cause, saying
// what became of each family.
func (f *Firewall) rollback(ctx context.Context, done []applyStep, cause error) error {
	if len(done) == 0 {
		return cause
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
	defer cancel()
	var back []string
	var errs []error
	for _, s := range done {
		fam := s.b.Family().String()
		if err := f.rollbackFamily(ctx, s); err != nil {
			f.log.Error("firewall rollback failed; this family enforces the new policy", "family", fam, "cause", cause, "err", err)
			errs = append(errs, fmt.Errorf("rolling %s back to what it enforced before also failed, so it enforces the new policy: %w", fam, err))
			continue
		}
		f.log.Warn("firewall rolled back to what it enforced before, because another family failed", "family", fam, "cause", cause)
		back = append(back, fam)
	}
	if len(errs) > 0 {
		backstop := "Run's drift repair will put the previous policy back"
		if f.desired == nil {
			backstop = "there is no previous policy for Run to restore; apply a policy again or remove the rules"
		}
		return fmt.Errorf("%w; %w (%s)", cause, errors.Join(errs...), backstop)
	}
	return fmt.Errorf("%w; %s rolled back to what it enforced before", cause, strings.Join(back, ", "))
}

// rollbackFamily commits s's family back to previous(s), counted as
// reason "rollback".
func (f *Firewall) rollbackFamily(ctx context.Context, s applyStep) error {
	fam := s.b.Family()
	l, err := readLive(ctx, s.b)
	if err != nil {
		f.m.errors.WithLabelValues(fam.String(), "read").Inc()
		return fmt.Errorf("read %s state: %w", fam, err)
	}
	return f.commit(ctx, s.b, f.plan(fam, l, f.previous(s)), "rollback")
}

// previous is what s's family goes back to when Apply fails part-way: the
// policy Run keeps in place, or, when there is none (start-up, or after
// Remove), what the kernel had when this Apply read it, hook by hook: the
// chain an earlier run left behind the hook's jump, or none of Bastion's.
//
// The latter takes out again the rules this Apply put where there were
// none, and that is the fail-closed choice. Bastion cannot know what the
// box's other rules and chain policies allow (its chains accept lan
// services, loopback and replies ahead of them), so the state it found is
// the only one it can vouch for as no more open than before. Keeping the
// new rules on one family would not close the box either: the failed
// family is as open as it was. And a gateway whose first Apply fails does
// not start, so none of its listeners is behind the restored state.
func (f *Firewall) previous(s applyStep) []Chain {
	if f.desired != nil {
		return f.desired.Chains(s.b.Family())
	}
	var out []Chain
	for _, h := range []struct{ hook, prefix string }{{"INPUT", inputPrefix}, {"FORWARD", forwardPrefix}} {
		for _, r := range s.before.hooks[h.hook] {
			if isOurJump(r.Rule) {
				out = append(out, Chain{Hook: h.hook, Prefix: h.prefix, Rules: rulesOf(s.before.chains[r.Rule.Target()])})
				break
			}
		}
	}
	return out
}

// Diff reports, without changing anything, what Apply(p) would change, as
// +/- lines per family ("no changes" when there is nothing to do).
func (f *Firewall) Diff(ctx context.Context, p Policy) (string, error) {
	rs, err := Plan(p)
	if err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for _, be := range f.backends {
		l, err := readLive(ctx, be)
		if err != nil {
			return "", fmt.Errorf("firewall diff: read %s state: %w", be.Family(), err)
		}
		ch := f.plan(be.Family(), l, rs.Chains(be.Family()))
		if ch.empty() {
			fmt.Fprintf(&b, "%s: no changes\n", be.Family())
			continue
		}
		fmt.Fprintf(&b, "%s:\n", be.Family())
		for _, t := range ch.text {
			fmt.Fprintf(&b, "  %s\n", t)
		}
	}
	return b.String(), nil
}

// reconcile checks both families once against the last applied policy and
// repairs what it finds. Each family found changed is recorded as a drift
// event, repaired or not.
func (f *Firewall) reconcile(ctx context.Context) error {
	events, err := f.repair(ctx)
	for _, e := range events {
		f.recordDrift(e)
	}
	return err
}

// repair is reconcile under f.mu; it returns the drift events to record.
func (f *Firewall) repair(ctx context.Context) ([]DriftEvent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.desired == nil {
		return nil, nil
	}
	var errs []error
	var events []DriftEvent
	for _, b := range f.backends {
		fam := b.Family().String()
		l, err := readLive(ctx, b)
		if err != nil {
			f.m.errors.WithLabelValues(fam, "read").Inc()
			errs = append(errs, fmt.Errorf("firewall reconcile: read %s state: %w", fam, err))
			continue
		}
		ch := f.plan(b.Family(), l, f.desired.Chains(b.Family()))
		if ch.empty() {
			continue
		}
		e := DriftEvent{Time: f.now(), Family: b.Family()}
		for _, fd := range ch.findings {
			f.log.Warn("firewall drift found", "family", fam, "kind", fd.kind, "detail", fd.detail)
			e.Findings = append(e.Findings, DriftFinding{Kind: fd.kind, Detail: fd.detail})
		}
		if err := f.commit(ctx, b, ch, "repair"); err != nil {
			e.Err = err.Error()
			events = append(events, e)
			errs = append(errs, fmt.Errorf("firewall repair %s: %w", fam, err))
			continue
		}
		events = append(events, e)
		for _, fd := range ch.findings {
			f.m.drift.WithLabelValues(fam, fd.kind).Inc()
		}
		f.log.Warn("firewall drift repaired", "family", fam, "findings", len(ch.findings))
	}
	return events, errors.Join(errs...)
}

// recordDrift keeps e among the last DriftHistory events and passes it to
// the drift hook.
func (f *Firewall) recordDrift(e DriftEvent) {
	f.driftMu.Lock()
	if len(f.drift) == DriftHistory {
		f.drift = slices.Delete(f.drift, 0, 1)
	}
	f.drift = append(f.drift, e)
	f.driftMu.Unlock()
	if f.onDrift != nil {
		f.onDrift(e)
	}
}

// Drift returns the last DriftHistory drift events, newest first (in
// memory: a restart forgets them; the gateway's audit log keeps them).
func (f *Firewall) Drift() []DriftEvent {
	f.driftMu.Lock()
	defer f.driftMu.Unlock()
	out := make([]DriftEvent, len(f.drift))
	for i, e := range f.drift {
		e.Findings = slices.Clone(e.Findings)
		out[len(out)-1-i] = e
	}
	return out
}

// Run re-checks the kernel every interval against the last applied policy
// and repairs drift, until ctx ends. It returns nil on cancellation and
// leaves the rules in place (fail closed).
func (f *Firewall) Run(ctx context.Context) error {
	t := time.NewTicker(f.interval)
	defer t.Stop()
	for {
		if err := f.reconcile(ctx); err != nil && ctx.Err() == nil {
			f.log.Error("firewall reconcile failed; will retry", "err", err, "retry_in", f.interval)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Remove takes all of Bastion's rules out of both families and forgets the
// policy, so Run no longer restores it. It is the only way the rules go.
func (f *Firewall) Remove(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.desired = nil
	f.canon = map[Family]map[string]canonChain{IPv4: {}, IPv6: {}}
	var errs []error
	for _, b := range f.backends {
		fam := b.Family().String()
		l, err := readLive(ctx, b)
		if err != nil {
			errs = append(errs, fmt.Errorf("firewall remove: read %s state: %w", fam, err))
			continue
		}
		var ops []Op
		for _, h := range []string{"INPUT", "FORWARD"} {
			for _, r := range l.hooks[h] {
				if isOurJump(r.Rule) {
					ops = append(ops, Op{Kind: OpDelete, Chain: h, Rule: r.Rule})
				}
			}
		}
		for _, name := range l.names {
			if strings.HasPrefix(name, chainPrefix) {
				ops = append(ops, Op{Kind: OpFlush, Chain: name}, Op{Kind: OpDeleteChain, Chain: name})
			}
		}
		if len(ops) == 0 {
			continue
		}
		if err := b.Commit(ctx, ops); err != nil {
			f.m.errors.WithLabelValues(fam, "remove").Inc()
			errs = append(errs, fmt.Errorf("firewall remove %s: %w", fam, err))
			continue
		}
		f.m.commits.WithLabelValues(fam, "remove").Inc()
		f.log.Warn("firewall rules removed", "family", fam)
	}
	return errors.Join(errs...)
}

// DropCount is the counter of one dropping rule of Bastion's.
type DropCount struct {
	Family  Family
	Chain   string
	Label   string // invalid, ratelimit:<service>, default-drop, fwd-invalid, fwd-default-drop
	Packets uint64
	Bytes   uint64
}

// DropCounters reads the counters of every dropping rule in the chains
// the hooks jump to. Counters start at zero when a reload builds a chain.
func (f *Firewall) DropCounters(ctx context.Context) ([]DropCount, error) {
	var out []DropCount
	for _, b := range f.backends {
		l, err := readLive(ctx, b)
		if err != nil {
			return nil, fmt.Errorf("firewall drop counters: read %s state: %w", b.Family(), err)
		}
		for _, h := range []string{"INPUT", "FORWARD"} {
			for _, j := range l.hooks[h] {
				name := j.Rule.Target()
				if !isOurJump(j.Rule) {
					continue
				}
				for _, r := range l.chains[name] {
					if r.Rule.Target() == "DROP" {
						out = append(out, DropCount{Family: b.Family(), Chain: name, Label: r.Rule.Label(), Packets: r.Packets, Bytes: r.Bytes})
					}
				}
			}
		}
	}
	return out, nil
}

// Show renders the live state of Bastion's rules with their counters, and
// the drop counters, for `bastionctl firewall show`.
func (f *Firewall) Show(ctx context.Context) (string, error) {
	var b strings.Builder
	for _, be := range f.backends {
		l, err := readLive(ctx, be)
		if err != nil {
			return "", fmt.Errorf("firewall show: read %s state: %w", be.Family(), err)
		}
		fmt.Fprintf(&b, "%s:\n", be.Family())
		for _, h := range []string{"INPUT", "FORWARD"} {
			n := 0
			for i, r := range l.hooks[h] {
				if isOurJump(r.Rule) {
					n++
					fmt.Fprintf(&b, "  %s rule %d -> %s\n", h, i+1, r.Rule.Target())
				}
			}
			if n == 0 {
				fmt.Fprintf(&b, "  %s: no jump into Bastion's chains (not enforced)\n", h)
			}
		}
		names := slices.Sorted(func(yield func(string) bool) {
			for n := range l.chains {
				if !yield(n) {
					return
				}
			}
		})
		var drops []string
		for _, name := range names {
			fmt.Fprintf(&b, "  chain %s:\n  %10s %12s  rule\n", name, "packets", "bytes")
			for _, r := range l.chains[name] {
				fmt.Fprintf(&b, "  %10d %12d  %s\n", r.Packets, r.Bytes, r.Rule.String())
				if r.Rule.Target() == "DROP" {
					drops = append(drops, fmt.Sprintf("%s=%d", r.Rule.Label(), r.Packets))
				}
			}
		}
		sort.Strings(drops)
		if len(drops) > 0 {
			fmt.Fprintf(&b, "  dropped packets: %s\n", strings.Join(drops, " "))
		}
	}
	return b.String(), nil
}

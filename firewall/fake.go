package firewall

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Fake is an in-memory filter table with the semantics Bastion relies on
// from the kernel: transactions are all-or-nothing, a jump needs an
// existing chain, a chain can only be deleted when empty and unreferenced,
// -D removes the first exact match. Tests use it to run the real
// planning and reconcile code without root, and its extra methods to
// tamper with the table behind Bastion's back.
type Fake struct {
	mu      sync.Mutex
	family  Family
	order   []string // chain creation order, built-ins first
	chains  map[string][]LiveRule
	commits int
	failErr error
	readErr error
}

var builtinChains = []string{"INPUT", "FORWARD", "OUTPUT"}
var builtinTargets = map[string]bool{"ACCEPT": true, "DROP": true, "RETURN": true, "LOG": true, "REJECT": true}

// NewFake returns an empty filter table of family f.
func NewFake(f Family) *Fake {
	fk := &Fake{family: f, chains: map[string][]LiveRule{}}
	for _, c := range builtinChains {
		fk.chains[c] = nil
		fk.order = append(fk.order, c)
	}
	return fk
}

// Family implements Backend.
func (f *Fake) Family() Family { return f.family }

// Snapshot implements Backend.
func (f *Fake) Snapshot(ctx context.Context) (Table, error) {
	if err := ctx.Err(); err != nil {
		return Table{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.readErr != nil {
		return Table{}, f.readErr
	}
	t := Table{Chains: slices.Clone(f.order), Rules: map[string][]LiveRule{}}
	for name, rules := range f.chains {
		out := make([]LiveRule, len(rules))
		for i, r := range rules {
			out[i] = LiveRule{Rule: slices.Clone(r.Rule), Packets: r.Packets, Bytes: r.Bytes}
		}
		t.Rules[name] = out
	}
	return t, nil
}

// Commit implements Backend: ops are applied to a copy that replaces the
// table only if every op succeeds.
func (f *Fake) Commit(ctx context.Context, ops []Op) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := restoreScript(ops); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failErr != nil {
		return f.failErr
	}
	chains := make(map[string][]LiveRule, len(f.chains))
	for k, v := range f.chains {
		chains[k] = slices.Clone(v)
	}
	order := slices.Clone(f.order)
	for _, o := range ops {
		if err := fakeApply(chains, &order, o); err != nil {
			return fmt.Errorf("fake %s: commit %q: %w", f.family, o.String(), err)
		}
	}
	f.chains, f.order = chains, order
	f.commits++
	return nil
}

func fakeApply(chains map[string][]LiveRule, order *[]string, o Op) error {
	rules, exists := chains[o.Chain]
	if !exists && o.Kind != OpNewChain {
		return fmt.Errorf("chain %s does not exist", o.Chain)
	}
	checkTarget := func() error {
		t := o.Rule.Target()
		if _, ok := chains[t]; !ok && !builtinTargets[t] {
			return fmt.Errorf("jump to unknown chain %q", t)
		}
		return nil
	}
	switch o.Kind {
	case OpNewChain:
		if !exists {
			*order = append(*order, o.Chain)
		}
		chains[o.Chain] = nil
	case OpAppend:
		if err := checkTarget(); err != nil {
			return err
		}
		chains[o.Chain] = append(rules, LiveRule{Rule: slices.Clone(o.Rule)})
	case OpInsert:
		if err := checkTarget(); err != nil {
			return err
		}
		if o.Pos < 1 || o.Pos > len(rules)+1 {
			return fmt.Errorf("index %d out of range", o.Pos)
		}
		chains[o.Chain] = slices.Insert(rules, o.Pos-1, LiveRule{Rule: slices.Clone(o.Rule)})
	case OpDelete:
		i := slices.IndexFunc(rules, func(r LiveRule) bool { return slices.Equal(r.Rule, o.Rule) })
		if i < 0 {
			return fmt.Errorf("bad rule (does a matching rule exist in that chain?)")
		}
		chains[o.Chain] = slices.Delete(rules, i, i+1)
	case OpFlush:
		chains[o.Chain] = nil
	case OpDeleteChain:
		if slices.Contains(builtinChains, o.Chain) {
			return fmt.Errorf("cannot delete built-in chain")
		}
		if len(rules) > 0 {
			return fmt.Errorf("directory not empty")
		}
		for name, rs := range chains {
			for _, r := range rs {
				if r.Rule.Target() == o.Chain {
					return fmt.Errorf("too many links: referenced from %s", name)
				}
			}
		}
		delete(chains, o.Chain)
		*order = slices.DeleteFunc(*order, func(c string) bool { return c == o.Chain })
	default:
		return fmt.Errorf("unknown op kind %d", o.Kind)
	}
	return nil
}

// Commits counts successful transactions.
func (f *Fake) Commits() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.commits
}

// FailCommits makes every Commit fail with err and change nothing, until
// called again with nil.
func (f *Fake) FailCommits(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failErr = err
}

// FailSnapshots makes every Snapshot fail with err, until called again
// with nil.
func (f *Fake) FailSnapshots(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.readErr = err
}

// Tamper applies ops directly, as another program would, without counting
// a commit. It fails like Commit on ops the kernel would refuse.
func (f *Fake) Tamper(ops ...Op) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, o := range ops {
		if err := fakeApply(f.chains, &f.order, o); err != nil {
			return fmt.Errorf("fake %s: tamper %q: %w", f.family, o.String(), err)
		}
	}
	return nil
}

// Count adds packets and bytes to the counters of rule i (0-based) of
// chain, as traffic would.
func (f *Fake) Count(chain string, i int, packets, bytes uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	rules := f.chains[chain]
	if i < 0 || i >= len(rules) {
		return fmt.Errorf("fake %s: count %s rule %d: no such rule", f.family, chain, i)
	}
	rules[i].Packets += packets
	rules[i].Bytes += bytes
	return nil
}

// Save renders the table like `iptables-save` without counters: built-in
// chains first, user chains sorted, then every chain's rules.
func (f *Fake) Save() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	b.WriteString("*filter\n")
	user := slices.DeleteFunc(slices.Clone(f.order), func(c string) bool { return slices.Contains(builtinChains, c) })
	sort.Strings(user)
	for _, c := range builtinChains {
		fmt.Fprintf(&b, ":%s ACCEPT\n", c)
	}
	for _, c := range user {
		fmt.Fprintf(&b, ":%s -\n", c)
	}
	for _, c := range append(slices.Clone(builtinChains), user...) {
		for _, r := range f.chains[c] {
			fmt.Fprintf(&b, "-A %s %s\n", c, quoteArgs(r.Rule))
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

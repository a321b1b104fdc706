package firewall

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/internal/netns"
	"github.com/bastion-iot/bastion/internal/testenv"
	tnetns "github.com/bastion-iot/bastion/internal/testutil/netns"
)

// policy100 has 50 handshake-limited services on lan: 100 service rules
// per family (a hashlimit drop and an accept each). Variants differ in
// their ports, so every apply really replaces the chain.
func policy100(variant int) Policy {
	p := gatewayPolicy("lan0", "wan0")
	p.Services = nil
	for i := range 50 {
		p.Services = append(p.Services, Service{
			Name: fmt.Sprintf("svc%d", i), Proto: TCP, Port: uint16(10000 + variant*100 + i),
			Zones: []string{ZoneLAN}, Handshake: true,
		})
	}
	return p
}

// naiveApply does what a go-iptables user would: build the new chains
// with one iptables command per rule, insert the jumps, then delete the
// old jumps and chains. It runs inside the namespace ns.
func naiveApply(ns string, ipts map[Family]*iptables.IPTables, rs Ruleset, gen int) error {
	return netns.Do(ns, func() error {
		for fam, ipt := range ipts {
			for _, c := range rs.Chains(fam) {
				name := fmt.Sprintf("NAIVE-%s-%d", c.Hook, gen)
				if err := ipt.NewChain("filter", name); err != nil {
					return err
				}
				for _, r := range c.Rules {
					if err := ipt.Append("filter", name, r...); err != nil {
						return err
					}
				}
				if err := ipt.Insert("filter", c.Hook, 1, "-j", name); err != nil {
					return err
				}
				if gen > 0 {
					old := fmt.Sprintf("NAIVE-%s-%d", c.Hook, gen-1)
					if err := ipt.Delete("filter", c.Hook, "-j", old); err != nil {
						return err
					}
					if err := ipt.ClearAndDeleteChain("filter", old); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})
}

// naiveReload flushes the existing naive chains and refills them rule by
// rule, as a simple go-iptables user reloads.
func naiveReload(ns string, ipts map[Family]*iptables.IPTables, rs Ruleset) error {
	return netns.Do(ns, func() error {
		for fam, ipt := range ipts {
			for _, c := range rs.Chains(fam) {
				name := fmt.Sprintf("NAIVE-%s-0", c.Hook)
				if err := ipt.ClearChain("filter", name); err != nil {
					return err
				}
				for _, r := range c.Rules {
					if err := ipt.Append("filter", name, r...); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})
}

func newGoIPTables(tb testing.TB) map[Family]*iptables.IPTables {
	tb.Helper()
	ipts := map[Family]*iptables.IPTables{}
	for fam, proto := range map[Family]iptables.Protocol{IPv4: iptables.ProtocolIPv4, IPv6: iptables.ProtocolIPv6} {
		var err error
		if ipts[fam], err = iptables.New(iptables.IPFamily(proto), iptables.Timeout(10)); err != nil {
			tb.Fatal(err)
		}
	}
	return ipts
}

// BenchmarkApply100Rules applies a 100-rule policy to both families,
// Bastion's way (plan, diff, one iptables-restore transaction per family)
// and the naive go-iptables way (one exec per rule), alternating in the
// same run, each in its own namespace, and reports both and their ratio.
//
//	go test -run '^$' -bench Apply100Rules -benchtime 20x ./firewall/
func BenchmarkApply100Rules(b *testing.B) {
	testenv.RequireRoot(b)
	for _, c := range []string{"ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore"} {
		testenv.RequireCommand(b, c)
	}
	ctx := context.Background()
	gw, naive := tnetns.New(b, "bench"), tnetns.New(b, "naive")
	v4, v6, err := NewIPTables(InNetns(gw.Name))
	if err != nil {
		b.Fatal(err)
	}
	fw, err := New(v4, v6, discard(), prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	ipts := newGoIPTables(b)
	policies := []Policy{policy100(0), policy100(1)}
	rulesets := make([]Ruleset, 2)
	for i, p := range policies {
		if rulesets[i], err = Plan(p); err != nil {
			b.Fatal(err)
		}
	}
	n := 0
	for _, c := range rulesets[0].IPv4 {
		n += len(c.Rules)
	}
	b.Logf("IPv4 rules per apply: %d (plus as many for IPv6)", n)

	var ours, theirs, noop time.Duration
	gen := 0
	for b.Loop() {
		p := policies[gen%2]
		t0 := time.Now()
		if err := fw.Apply(ctx, p); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := fw.Apply(ctx, p); err != nil { // already in force: read and compare only
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := naiveApply(naive.Name, ipts, rulesets[gen%2], gen); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		ours += t1.Sub(t0)
		noop += t2.Sub(t1)
		theirs += t3.Sub(t2)
		gen++
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / float64(gen) }
	b.ReportMetric(ms(ours), "bastion-ms/apply")
	b.ReportMetric(ms(noop), "bastion-noop-ms/apply")
	b.ReportMetric(ms(theirs), "goiptables-ms/apply")
	b.ReportMetric(float64(theirs)/float64(ours), "speedup-x")
	b.Logf("apply of %d rules x 2 families: bastion %.1f ms, go-iptables one by one %.1f ms, ratio %.1fx; no-op re-apply %.1f ms",
		n, ms(ours), ms(theirs), float64(theirs)/float64(ours), ms(noop))
}

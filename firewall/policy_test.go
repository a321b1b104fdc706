package firewall

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestValidate(t *testing.T) {
	base := func() Policy { return gatewayPolicy("eth1", "eth0") }
	cases := map[string]struct {
		mod  func(p *Policy)
		want string // substring of the error; "" means valid
	}{
		"default policy":        {func(p *Policy) {}, ""},
		"no services":           {func(p *Policy) { p.Services = nil }, ""},
		"wildcard iface":        {func(p *Policy) { p.Zones[0].Interfaces = []string{"wlan+"} }, ""},
		"forward lan to wan":    {func(p *Policy) { p.Forward = []ForwardRule{{From: "lan", To: "wan", Proto: TCP, Port: 443}} }, ""},
		"service on wan":        {func(p *Policy) { p.Services[1].Zones = []string{"lan", "wan"} }, "services[1] (mqtt-tls): zone wan: the wan zone may never have services"},
		"unknown zone name":     {func(p *Policy) { p.Zones[0].Name = "dmz" }, `zones[0]: name "dmz": must be "lan" or "wan"`},
		"zone twice":            {func(p *Policy) { p.Zones[1].Name = "lan" }, `zone "lan" is defined twice`},
		"zone without ifaces":   {func(p *Policy) { p.Zones[1].Interfaces = nil }, "zone wan: no interfaces"},
		"bad iface":             {func(p *Policy) { p.Zones[0].Interfaces = []string{"eth 1"} }, `interface "eth 1": must be 1-15 characters`},
		"long iface":            {func(p *Policy) { p.Zones[0].Interfaces = []string{"abcdefghijklmnop"} }, "must be 1-15 characters"},
		"quote in iface":        {func(p *Policy) { p.Zones[0].Interfaces = []string{`e"th`} }, "must be 1-15 characters"},
		"loopback in zone":      {func(p *Policy) { p.Zones[0].Interfaces = []string{"lo"} }, "zone lan: interface lo: loopback is always allowed"},
		"iface in two zones":    {func(p *Policy) { p.Zones[1].Interfaces = []string{"eth1"} }, `interface "eth1" is already in zone lan`},
		"bad service name":      {func(p *Policy) { p.Services[0].Name = "CoAPS!" }, `name "CoAPS!": must be 1-24 characters`},
		"duplicate name":        {func(p *Policy) { p.Services[1].Name = "coaps" }, `service name "coaps" is used twice`},
		"bad proto":             {func(p *Policy) { p.Services[0].Proto = "sctp" }, `proto "sctp": must be "tcp" or "udp"`},
		"port zero":             {func(p *Policy) { p.Services[0].Port = 0 }, "port 0: must be 1-65535"},
		"duplicate port":        {func(p *Policy) { p.Services[2].Port = 8883 }, "port 8883/tcp is already used by service mqtt-tls"},
		"service without zones": {func(p *Policy) { p.Services[0].Zones = nil }, "no zones: a service must name the zones"},
		"service unknown zone":  {func(p *Policy) { p.Zones = p.Zones[1:] }, `zone "lan" is not defined in zones`},
		"handshake no rate":     {func(p *Policy) { p.HandshakeRate = Rate{} }, "handshake limit requested but handshake rate is not set"},
		"bad rate period":       {func(p *Policy) { p.HandshakeRate.Per = 2 * time.Second }, "period must be 1s, 1m, 1h or 24h"},
		"zero burst":            {func(p *Policy) { p.HandshakeRate.Burst = 0 }, "count and burst must be positive"},
		"huge rate":             {func(p *Policy) { p.HandshakeRate.Count = 1 << 20 }, "at most 10000"},
		"ping wan":              {func(p *Policy) { p.Ping = []string{"wan"} }, "ping: zone wan: the gateway does not answer pings from wan"},
		"ping unknown":          {func(p *Policy) { p.Zones = p.Zones[1:]; p.Services = nil }, `ping: zone "lan" is not defined`},
		"forward from wan":      {func(p *Policy) { p.Forward = []ForwardRule{{From: "wan", To: "lan"}} }, "forwarding from wan is refused"},
		"forward unknown zone":  {func(p *Policy) { p.Forward = []ForwardRule{{From: "lan", To: "guest"}} }, `to zone "guest" is not defined`},
		"forward bad proto":     {func(p *Policy) { p.Forward = []ForwardRule{{From: "lan", To: "wan", Proto: "icmp"}} }, `proto "icmp": must be empty (any)`},
		"forward port no proto": {func(p *Policy) { p.Forward = []ForwardRule{{From: "lan", To: "wan", Port: 80}} }, "port 80 needs a proto"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := base()
			c.mod(&p)
			err := p.Validate()
			switch {
			case c.want == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)):
				t.Errorf("Validate() = %v, want error containing %q", err, c.want)
			}
		})
	}
}

func TestValidateDoesNotMutate(t *testing.T) {
	p := gatewayPolicy("eth1", "eth0")
	p.Services[0].Zones = []string{"wan"}
	before := gatewayPolicy("eth1", "eth0")
	before.Services[0].Zones = []string{"wan"}
	_ = p.Validate()
	if diff := cmp.Diff(before, p); diff != "" {
		t.Errorf("Validate changed the policy (-want +got):\n%s", diff)
	}
}

func TestParseRate(t *testing.T) {
	good := map[string]Rate{
		"20/second burst 40": {20, time.Second, 40},
		"5/min":              {5, time.Minute, 5},
		"1/h burst 3":        {1, time.Hour, 3},
		"100/day burst 100":  {100, 24 * time.Hour, 100},
	}
	for in, want := range good {
		got, err := ParseRate(in)
		if err != nil {
			t.Errorf("ParseRate(%q): %v", in, err)
			continue
		}
		if got != want {
			t.Errorf("ParseRate(%q) = %+v, want %+v", in, got, want)
		}
		if back, err := ParseRate(got.String()); err != nil || back != got {
			t.Errorf("ParseRate(%q.String()=%q) = %+v, %v", in, got.String(), back, err)
		}
	}
	bad := map[string]string{
		"":                   "want",
		"20":                 `missing "/<unit>"`,
		"0/second":           "must be a positive integer",
		"x/second":           "must be a positive integer",
		"20/fortnight":       "must be second, minute, hour or day",
		"20/second bursts 4": `expected "burst"`,
		"20/second burst 0":  "burst \"0\" must be a positive integer",
		"20/second burst":    "want",
		"99999/second":       "at most 10000",
	}
	for in, want := range bad {
		if _, err := ParseRate(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseRate(%q) = %v, want error containing %q", in, err, want)
		}
	}
}

func hasArgs(r Rule, args ...string) bool {
	for i := 0; i+len(args) <= len(r); i++ {
		if slices.Equal(r[i:i+len(args)], args) {
			return true
		}
	}
	return false
}

func TestPlanSecurityProperties(t *testing.T) {
	p := gatewayPolicy("eth1", "eth0")
	p.Zones[0].Interfaces = append(p.Zones[0].Interfaces, "wlan+")
	p.Forward = []ForwardRule{{From: "lan", To: "wan", Proto: TCP, Port: 443}}
	rs, err := Plan(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, fam := range []Family{IPv4, IPv6} {
		chains := rs.Chains(fam)
		if len(chains) != 2 || chains[0].Hook != "INPUT" || chains[1].Hook != "FORWARD" {
			t.Fatalf("%s: chains %+v", fam, chains)
		}
		for _, c := range chains {
			last := c.Rules[len(c.Rules)-1]
			if !slices.Equal(last[len(last)-2:], []string{"-j", "DROP"}) || len(last) != 6 {
				t.Errorf("%s %s: last rule %v is not an unconditional drop", fam, c.Hook, last)
			}
			for _, r := range c.Rules {
				// Nothing on wan: the only accept that names a wan
				// interface as input is IPv6 router advertisements.
				if hasArgs(r, "-i", "eth0") && r.Target() == "ACCEPT" && r.Label() != "nd-ra" {
					t.Errorf("%s %s: accept on wan: %v", fam, c.Hook, r)
				}
				if r.Target() == "ACCEPT" && c.Hook == "INPUT" && (hasArgs(r, "-p", "tcp") || hasArgs(r, "-p", "udp")) && !hasArgs(r, "-i", "eth1") && !hasArgs(r, "-i", "wlan+") {
					t.Errorf("%s: service accept not bound to a lan interface: %v", fam, r)
				}
			}
		}
		in := chains[0].Rules
		for _, svc := range p.Services {
			for _, ifc := range []string{"eth1", "wlan+"} {
				acc := slices.IndexFunc(in, func(r Rule) bool {
					return r.Label() == "svc:"+svc.Name && hasArgs(r, "-i", ifc)
				})
				if acc < 0 {
					t.Errorf("%s: no accept for %s on %s", fam, svc.Name, ifc)
					continue
				}
				lim := slices.IndexFunc(in, func(r Rule) bool {
					return r.Label() == labelRateLimit+svc.Name && hasArgs(r, "-i", ifc)
				})
				if svc.Handshake && (lim < 0 || lim > acc) {
					t.Errorf("%s: %s on %s: rate limit at %d must come before accept at %d", fam, svc.Name, ifc, lim, acc)
				}
				if !svc.Handshake && lim >= 0 {
					t.Errorf("%s: %s has a rate limit it did not ask for", fam, svc.Name)
				}
			}
		}
		fwd := chains[1].Rules
		n := 0
		for _, r := range fwd {
			if r.Target() == "ACCEPT" && r.Label() != "established" && r.Label() != "related" {
				n++
				if !hasArgs(r, "-o", "eth0") || !hasArgs(r, "--dport", "443") {
					t.Errorf("%s: forward accept %v is not lan->wan:443", fam, r)
				}
			}
		}
		if n != 2 {
			t.Errorf("%s: %d forward accepts, want 2 (one per lan interface)", fam, n)
		}
	}
	// IPv6 neighbour discovery and PMTU are allowed; IPv4 PMTU too.
	find := func(fam Family, args ...string) bool {
		return slices.ContainsFunc(rs.Chains(fam)[0].Rules, func(r Rule) bool { return hasArgs(r, args...) && r.Target() == "ACCEPT" })
	}
	for _, want := range [][]string{{"--icmpv6-type", "135"}, {"--icmpv6-type", "136"}, {"--icmpv6-type", "2"}, {"--icmpv6-type", "128"}} {
		if !find(IPv6, want...) {
			t.Errorf("IPv6 plan lacks accept with %v", want)
		}
	}
	if !find(IPv4, "--icmp-type", "3") || !find(IPv4, "--icmp-type", "8") {
		t.Error("IPv4 plan lacks unreachable (PMTU) or echo")
	}
}

func TestPlanDisabledServiceHasNoRule(t *testing.T) {
	p := gatewayPolicy("eth1", "eth0")
	p.Services = slices.DeleteFunc(p.Services, func(s Service) bool { return s.Name == "console" })
	rs, err := Plan(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, fam := range []Family{IPv4, IPv6} {
		for _, c := range rs.Chains(fam) {
			for _, r := range c.Rules {
				if hasArgs(r, "--dport", "8443") {
					t.Errorf("%s: disabled console still has %v", fam, r)
				}
			}
		}
	}
}

func TestPlanIsDeterministic(t *testing.T) {
	a := gatewayPolicy("eth1", "eth0")
	b := gatewayPolicy("eth1", "eth0")
	slices.Reverse(b.Services)
	ra, _ := Plan(a)
	rb, _ := Plan(b)
	if diff := cmp.Diff(ra, rb); diff != "" {
		t.Errorf("service order changed the plan (-a +b):\n%s", diff)
	}
	if ra.IPv4[0].name(0) == ra.IPv4[0].name(1) || ra.IPv4[0].name(0) == ra.IPv6[0].name(0) {
		t.Error("chain names collide across attempts or families")
	}
	s := ra.String()
	if !strings.Contains(s, "# iptables\n*filter\n:BASTION-IN-") || !strings.Contains(s, "# ip6tables\n") || strings.Count(s, "COMMIT\n") != 2 {
		t.Errorf("Ruleset.String():\n%s", s)
	}
}

func TestHashlimitNameTracksRate(t *testing.T) {
	s := Service{Name: "mqtt-tls", Proto: TCP, Port: 65535, Handshake: true}
	name := func(r Rate) string {
		m := hashlimit(r, IPv4, s)
		return m[slices.Index(m, "--hashlimit-name")+1]
	}
	a, b := name(Rate{20, time.Second, 40}), name(Rate{20, time.Second, 41})
	if a == b {
		t.Errorf("rates differ but hashlimit names are both %q: the kernel would keep the old rate", a)
	}
	if len(a) > 15 {
		t.Errorf("hashlimit name %q is longer than the kernel's 15 characters", a)
	}
	if a != name(Rate{20, time.Second, 40}) {
		t.Error("same rate, different hashlimit name: buckets would reset on every reload")
	}
}

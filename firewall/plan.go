package firewall

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Family is an IP address family; each has its own backend and rules.
type Family int

// The two families Bastion always manages together.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// Names of Bastion's chains are prefix + "-" + 8 hex digits of a hash of
// their content, so identical content gets an identical name on every box
// and a changed policy always lands in a fresh chain.
const (
	chainPrefix   = "BASTION-"
	inputPrefix   = "BASTION-IN"
	forwardPrefix = "BASTION-FWD"
	commentPrefix = "bastion:"
	jumpLabel     = "jump"
)

// Rule is one rule as the arguments that follow "-A <chain>", written in
// the canonical form `iptables -S` prints, so that desired and live rules
// compare token by token.
type Rule []string

// Label is the text after "bastion:" in the rule's comment, "" if none.
func (r Rule) Label() string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "--comment" {
			return strings.TrimPrefix(r[i+1], commentPrefix)
		}
	}
	return ""
}

// Target is the rule's -j argument.
func (r Rule) Target() string {
	for i := 0; i+1 < len(r); i++ {
		if r[i] == "-j" {
			return r[i+1]
		}
	}
	return ""
}

func (r Rule) String() string { return quoteArgs(r) }

// Chain is the desired content of one of Bastion's chains and the built-in
// chain (Hook) whose single jump leads to it.
type Chain struct {
	Hook   string // "INPUT" or "FORWARD"
	Prefix string // "BASTION-IN" or "BASTION-FWD"
	Rules  []Rule
}

// name returns the chain name for attempt n (n > 0 only when a chain of
// the first name already exists with other content, e.g. after someone
// flushed it).
func (c Chain) name(n int) string {
	h := sha256.New()
	for _, r := range c.Rules {
		for _, a := range r {
			h.Write([]byte(a))
			h.Write([]byte{0})
		}
		h.Write([]byte{'\n'})
	}
	var nb [8]byte
	binary.BigEndian.PutUint64(nb[:], uint64(n))
	h.Write(nb[:])
	return c.Prefix + "-" + hex.EncodeToString(h.Sum(nil)[:4])
}

// Ruleset is the desired state of both families, as plain data.
type Ruleset struct {
	IPv4 []Chain
	IPv6 []Chain
}

// Chains returns the chains of family f.
func (rs Ruleset) Chains(f Family) []Chain {
	if f == IPv6 {
		return rs.IPv6
	}
	return rs.IPv4
}

// String renders the ruleset as the iptables-save text it would produce,
// for showing a plan where nothing can be applied (no root, --dev).
func (rs Ruleset) String() string {
	var b strings.Builder
	for _, f := range []Family{IPv4, IPv6} {
		fmt.Fprintf(&b, "# %s\n*filter\n", f)
		chains := rs.Chains(f)
		for _, c := range chains {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c.name(0))
		}
		for _, c := range chains {
			fmt.Fprintf(&b, "-A %s %s\n", c.Hook, quoteArgs(jumpRule(c.name(0))))
		}
		for _, c := range chains {
			for _, r := range c.Rules {
				fmt.Fprintf(&b, "-A %s %s\n", c.name(0), quoteArgs(r))
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func jumpRule(chain string) Rule {
	return Rule{"-m", "comment", "--comment", commentPrefix + jumpLabel, "-j", chain}
}

// ruleBuilder writes rules in the canonical order iptables -S prints:
// addresses and interfaces, protocol, matches in the order added, the
// comment, then the target.
type ruleBuilder struct {
	src, in, out, proto string
	matches             []string
}

func (b ruleBuilder) with(m ...string) ruleBuilder {
	b.matches = append(slices.Clip(b.matches), m...)
	return b
}

func (b ruleBuilder) rule(label string, target ...string) Rule {
	var r Rule
	if b.src != "" {
		r = append(r, "-s", b.src)
	}
	if b.in != "" {
		r = append(r, "-i", b.in)
	}
	if b.out != "" {
		r = append(r, "-o", b.out)
	}
	if b.proto != "" {
		r = append(r, "-p", b.proto)
	}
	r = append(r, b.matches...)
	r = append(r, "-m", "comment", "--comment", commentPrefix+label, "-j")
	return append(r, target...)
}

func portMatch(p Proto, port uint16) []string {
	return []string{"-m", string(p), "--dport", strconv.Itoa(int(port))}
}

// Labels of the rules whose drops are counted (see DropCounters).
const (
	labelInvalid     = "invalid"
	labelDefaultDrop = "default-drop"
	labelRateLimit   = "ratelimit:"
)

// Plan compiles p into the rules for both families. It is pure: it needs
// no root and touches nothing, so it can show a plan anywhere.
func Plan(p Policy) (Ruleset, error) {
	if err := p.Validate(); err != nil {
		return Ruleset{}, fmt.Errorf("firewall policy: %w", err)
	}
	var rs Ruleset
	for _, f := range []Family{IPv4, IPv6} {
		chains := []Chain{
			{Hook: "INPUT", Prefix: inputPrefix, Rules: inputRules(p, f)},
			{Hook: "FORWARD", Prefix: forwardPrefix, Rules: forwardRules(p)},
		}
		if f == IPv4 {
			rs.IPv4 = chains
		} else {
			rs.IPv6 = chains
		}
	}
	return rs, nil
}

func ifaces(p Policy, zone string) []string {
	for _, z := range p.Zones {
		if z.Name == zone {
			return z.Interfaces
		}
	}
	return nil
}

// stateful accepts replies to connections and the ICMP errors and
// expectations related to them, and drops what conntrack cannot place. It
// accepts an established connection's packets only in the reply direction:
// the packets the connection's opener sends go through the policy's rules
// again, every one of them, so a service or forward that a reload closes is
// closed for the connections already open to it too, at the next packet.
// (Accepting every ESTABLISHED packet here is the usual rule set, and it
// kept such a connection open until it ended.)
func stateful(label string) []Rule {
	return []Rule{
		ruleBuilder{}.with("-m", "conntrack", "--ctstate", "ESTABLISHED", "--ctdir", "REPLY").rule("established", "ACCEPT"),
		ruleBuilder{}.with("-m", "conntrack", "--ctstate", "RELATED").rule("related", "ACCEPT"),
		ruleBuilder{}.with("-m", "conntrack", "--ctstate", "INVALID").rule(label+labelInvalid, "DROP"),
	}
}

func logAndDrop(prefix, label string) []Rule {
	return []Rule{
		ruleBuilder{}.with("-m", "limit", "--limit", "10/min", "--limit-burst", "20").
			rule(label+"log", "LOG", "--log-prefix", prefix),
		ruleBuilder{}.rule(label+labelDefaultDrop, "DROP"),
	}
}

func inputRules(p Policy, f Family) []Rule {
	rules := []Rule{ruleBuilder{in: "lo"}.rule("loopback", "ACCEPT")}
	rules = append(rules, stateful("")...)

	// ICMP the protocols need. Errors (unreachable incl. fragmentation
	// needed / packet too big for PMTU discovery, time exceeded, parameter
	// problem) are accepted everywhere; conntrack marks most of them
	// RELATED anyway. Echo only in the zones the policy names.
	if f == IPv4 {
		icmp := ruleBuilder{proto: "icmp"}
		for _, t := range []string{"3", "11", "12"} {
			rules = append(rules, icmp.with("-m", "icmp", "--icmp-type", t).rule("icmp", "ACCEPT"))
		}
		for _, z := range p.Ping {
			for _, ifc := range ifaces(p, z) {
				b := ruleBuilder{in: ifc, proto: "icmp"}
				rules = append(rules, b.with("-m", "icmp", "--icmp-type", "8", "-m", "limit", "--limit", "20/sec", "--limit-burst", "50").rule("ping", "ACCEPT"))
			}
		}
	} else {
		icmp6 := func(b ruleBuilder, t string) ruleBuilder {
			b.proto = "ipv6-icmp"
			return b.with("-m", "icmp6", "--icmpv6-type", t)
		}
		// 1 unreachable, 2 packet too big (PMTU), 3 time exceeded, 4 parameter problem.
		for _, t := range []string{"1", "2", "3", "4"} {
			rules = append(rules, icmp6(ruleBuilder{}, t).rule("icmp", "ACCEPT"))
		}
		// Neighbour discovery (RFC 4861) only from on-link senders: a hop
		// limit of 255 cannot have crossed a router. 135/136 solicitation
		// and advertisement on every interface (wan addressing needs them).
		for _, t := range []string{"135", "136"} {
			rules = append(rules, icmp6(ruleBuilder{}, t).with("-m", "hl", "--hl-eq", "255").rule("nd", "ACCEPT"))
		}
		// Router advertisements only from wan (upstream router), router
		// solicitations only from lan: a lan device must not steer our routes.
		for _, ifc := range ifaces(p, ZoneWAN) {
			rules = append(rules, icmp6(ruleBuilder{src: "fe80::/10", in: ifc}, "134").with("-m", "hl", "--hl-eq", "255").rule("nd-ra", "ACCEPT"))
		}
		for _, ifc := range ifaces(p, ZoneLAN) {
			rules = append(rules, icmp6(ruleBuilder{in: ifc}, "133").with("-m", "hl", "--hl-eq", "255").rule("nd-rs", "ACCEPT"))
		}
		// Multicast listener discovery (RFC 4890 4.4.1) from link-local.
		for _, t := range []string{"130", "131", "132", "143"} {
			rules = append(rules, icmp6(ruleBuilder{src: "fe80::/10"}, t).rule("mld", "ACCEPT"))
		}
		for _, z := range p.Ping {
			for _, ifc := range ifaces(p, z) {
				rules = append(rules, icmp6(ruleBuilder{in: ifc}, "128").with("-m", "limit", "--limit", "20/sec", "--limit-burst", "50").rule("ping", "ACCEPT"))
			}
		}
	}

	svcs := slices.Clone(p.Services)
	slices.SortStableFunc(svcs, func(a, b Service) int {
		if a.Port != b.Port {
			return int(a.Port) - int(b.Port)
		}
		return strings.Compare(string(a.Proto), string(b.Proto))
	})
	for _, s := range svcs {
		for _, z := range s.Zones {
			for _, ifc := range ifaces(p, z) {
				b := ruleBuilder{in: ifc, proto: string(s.Proto)}.with(portMatch(s.Proto, s.Port)...)
				if s.Handshake {
					rules = append(rules, b.with(hashlimit(p.HandshakeRate, f, s)...).rule(labelRateLimit+s.Name, "DROP"))
				}
				rules = append(rules, b.rule("svc:"+s.Name, "ACCEPT"))
			}
		}
	}
	return append(rules, logAndDrop("bastion drop in: ", "")...)
}

// hashlimit returns the match that is true for new connections above the
// per-source rate. The table name carries a hash of the rate, because the
// kernel keeps the first configuration of a named table; a changed rate
// must get a new table, an unchanged one keeps its buckets across reloads.
func hashlimit(r Rate, f Family, s Service) []string {
	sum := sha256.Sum256([]byte(r.String()))
	// bst + 4 hex + t/u + port: at most 13 of the kernel's 15 characters.
	name := fmt.Sprintf("bst%s%c%d", hex.EncodeToString(sum[:2]), s.Proto[0], s.Port)
	m := []string{"-m", "conntrack", "--ctstate", "NEW",
		"-m", "hashlimit", "--hashlimit-above", fmt.Sprintf("%d/%s", r.Count, r.unit()),
		"--hashlimit-burst", strconv.Itoa(int(r.Burst)), "--hashlimit-mode", "srcip", "--hashlimit-name", name}
	if f == IPv6 {
		// One IPv6 host usually owns a whole /64; limiting per /128 would
		// let it rotate addresses around the limit.
		// (iptables prints the mask after the name.)
		m = append(m, "--hashlimit-srcmask", "64")
	}
	return m
}

func forwardRules(p Policy) []Rule {
	rules := stateful("fwd-")
	for _, fw := range p.Forward {
		for _, in := range ifaces(p, fw.From) {
			for _, out := range ifaces(p, fw.To) {
				b := ruleBuilder{in: in, out: out, proto: string(fw.Proto)}
				if fw.Port != 0 {
					b = b.with(portMatch(fw.Proto, fw.Port)...)
				}
				rules = append(rules, b.rule(fmt.Sprintf("fwd:%s-%s", fw.From, fw.To), "ACCEPT"))
			}
		}
	}
	return append(rules, logAndDrop("bastion drop fwd: ", "fwd-")...)
}

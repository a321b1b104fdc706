package firewall

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/internal/testenv"
	tnetns "github.com/bastion-iot/bastion/internal/testutil/netns"
)

var update = flag.Bool("update", false, "rewrite testdata/golden files")

// Addresses live only inside the namespaces the test makes: private and
// ULA on lan, documentation ranges on wan.
const (
	gwLAN4, cliLAN4 = "10.77.1.1", "10.77.1.2"
	gwLAN6, cliLAN6 = "fd77:1::1", "fd77:1::2"
	gwWAN4, cliWAN4 = "198.51.100.1", "198.51.100.2"
	gwWAN6, cliWAN6 = "2001:db8:77::1", "2001:db8:77::2"
)

type target struct {
	network string
	port    int
}

func (t target) String() string { return fmt.Sprintf("%s/%d", t.network, t.port) }

// Every port something listens on in the gateway namespace.
var listening = []target{
	{"tcp", 22}, {"tcp", 1883}, {"tcp", 8443}, {"tcp", 8883}, {"tcp", 9000},
	{"udp", 5683}, {"udp", 5684}, {"udp", 5685},
}

type topo struct {
	gw, lan, wan *tnetns.NS
	v4, v6       Backend
}

// newTopo builds: a gateway namespace with lan0 and wan0, each a veth into
// a client namespace; listeners on every port in listening inside the
// gateway; and the real iptables backends pointed at the gateway.
func newTopo(t *testing.T) *topo {
	t.Helper()
	testenv.RequireRoot(t)
	for _, c := range []string{"ip", "iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"} {
		testenv.RequireCommand(t, c)
	}
	tp := &topo{gw: tnetns.New(t, "gw"), lan: tnetns.New(t, "lan"), wan: tnetns.New(t, "wan")}
	tnetns.Veth(t, tp.gw, "lan0", tp.lan, "eth0")
	tnetns.Veth(t, tp.gw, "wan0", tp.wan, "eth0")
	tp.gw.AddAddr("lan0", gwLAN4+"/24")
	tp.gw.AddAddr("lan0", gwLAN6+"/64")
	tp.gw.AddAddr("wan0", gwWAN4+"/24")
	tp.gw.AddAddr("wan0", gwWAN6+"/64")
	tp.lan.AddAddr("eth0", cliLAN4+"/24")
	tp.lan.AddAddr("eth0", cliLAN6+"/64")
	tp.wan.AddAddr("eth0", cliWAN4+"/24")
	tp.wan.AddAddr("eth0", cliWAN6+"/64")
	// The wan client can route to the gateway's lan addresses too, so the
	// test shows that arriving on wan is what counts, not the address.
	tp.wan.MustRun("ip", "route", "add", "10.77.1.0/24", "via", gwWAN4)
	tp.wan.MustRun("ip", "-6", "route", "add", "fd77:1::/64", "via", gwWAN6)
	for _, l := range listening {
		addr := "[::]:" + strconv.Itoa(l.port) // dual-stack
		if l.network == "tcp" {
			tp.gw.ServeTCP(addr)
		} else {
			tp.gw.ServeUDP(addr)
		}
	}
	// Wait (bounded) until neighbour discovery has settled on every link,
	// so that no later probe is the first packet to a neighbour.
	for _, c := range []struct {
		cli  *tnetns.NS
		host string
	}{{tp.lan, gwLAN4}, {tp.lan, gwLAN6}, {tp.wan, gwWAN4}, {tp.wan, gwWAN6}} {
		for try := 0; ; try++ {
			ok, err := c.cli.Answers(context.Background(), "tcp", net.JoinHostPort(c.host, "22"), time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				break
			}
			if try == 10 {
				t.Fatalf("%s never reached %s before any firewall", c.cli.Name, c.host)
			}
		}
	}
	var err error
	tp.v4, tp.v6, err = NewIPTables(InNetns(tp.gw.Name))
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

func (tp *topo) firewall(t *testing.T, opts ...Option) (*Firewall, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	fw, err := New(tp.v4, tp.v6, discard(), reg, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return fw, reg
}

// answering probes every listening port at host from client, concurrently,
// and returns the ones that answered.
func answering(t *testing.T, client *tnetns.NS, host string, timeout time.Duration) []string {
	t.Helper()
	var mu sync.Mutex
	var got []string
	var wg sync.WaitGroup
	for _, l := range listening {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := client.Answers(context.Background(), l.network, net.JoinHostPort(host, strconv.Itoa(l.port)), timeout)
			if err != nil {
				t.Error(err)
				return
			}
			if ok {
				mu.Lock()
				got = append(got, l.String())
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	slices.Sort(got)
	return got
}

func allListening() []string {
	var s []string
	for _, l := range listening {
		s = append(s, l.String())
	}
	slices.Sort(s)
	return s
}

func TestRealOnlyEnabledServicesAnswer(t *testing.T) {
	tp := newTopo(t)
	const probe = time.Second
	// Without Bastion every port answers from both sides: the probe can
	// tell open from closed.
	for _, c := range []struct {
		cli  *tnetns.NS
		host string
	}{{tp.lan, gwLAN4}, {tp.lan, gwLAN6}, {tp.wan, gwWAN4}, {tp.wan, gwWAN6}} {
		if diff := cmp.Diff(allListening(), answering(t, c.cli, c.host, probe)); diff != "" {
			t.Fatalf("before apply, %s from %s (-want +got):\n%s", c.host, c.cli.Name, diff)
		}
	}

	fw, _ := tp.firewall(t)
	if err := fw.Apply(context.Background(), gatewayPolicy("lan0", "wan0")); err != nil {
		t.Fatal(err)
	}
	enabled := []string{"tcp/8443", "tcp/8883", "udp/5684"}
	cases := []struct {
		name string
		cli  *tnetns.NS
		host string
		want []string
	}{
		{"lan ipv4", tp.lan, gwLAN4, enabled},
		{"lan ipv6", tp.lan, gwLAN6, enabled},
		{"wan ipv4", tp.wan, gwWAN4, nil},
		{"wan ipv6", tp.wan, gwWAN6, nil},
		{"wan to lan address ipv4", tp.wan, gwLAN4, nil},
		{"wan to lan address ipv6", tp.wan, gwLAN6, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if diff := cmp.Diff(c.want, answering(t, c.cli, c.host, probe)); diff != "" {
				t.Errorf("answering ports (-want +got):\n%s", diff)
			}
		})
	}
	drops, err := fw.DropCounters(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var dropped uint64
	for _, d := range drops {
		if d.Label == labelDefaultDrop {
			dropped += d.Packets
		}
	}
	if dropped == 0 {
		t.Errorf("default-drop counters are zero after probing closed ports: %+v", drops)
	}
}

func TestRealHandshakeRateLimit(t *testing.T) {
	tp := newTopo(t)
	fw, _ := tp.firewall(t)
	p := gatewayPolicy("lan0", "wan0")
	p.HandshakeRate = Rate{Count: 1, Per: time.Minute, Burst: 3}
	ctx := context.Background()
	if err := fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{gwLAN4, gwLAN6} {
		ok := 0
		for range 8 {
			a, err := tp.lan.Answers(ctx, "tcp", net.JoinHostPort(host, "8883"), 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			if a {
				ok++
			}
		}
		// Burst 3 at 1/minute: the first three handshakes pass, the rest
		// are dropped. The console (no handshake limit) still answers.
		if ok != 3 {
			t.Errorf("%s: %d of 8 new connections answered, want exactly the burst of 3", host, ok)
		}
		if a, _ := tp.lan.Answers(ctx, "tcp", net.JoinHostPort(host, "8443"), time.Second); !a {
			t.Errorf("%s: console (no handshake limit) stopped answering", host)
		}
	}
	drops, err := fw.DropCounters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range drops {
		if d.Label == labelRateLimit+"mqtt-tls" && d.Packets == 0 {
			t.Errorf("%s rate-limit drop counter is zero", d.Family)
		}
	}
}

var (
	saveComment  = regexp.MustCompile(`(?m)^#.*\n`)
	saveCounters = regexp.MustCompile(`\[\d+:\d+\]`)
)

// save returns iptables-save output without comments and counters.
func save(t *testing.T, ns *tnetns.NS, cmd string) string {
	t.Helper()
	out := ns.MustRun(cmd, "-t", "filter")
	return saveCounters.ReplaceAllString(saveComment.ReplaceAllString(out, ""), "[0:0]")
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s (-want +got):\n%s", path, diff)
	}
}

func TestRealGoldenAndIdempotent(t *testing.T) {
	tp := newTopo(t)
	fw, _ := tp.firewall(t)
	ctx := context.Background()
	// Every kind of rule Plan writes, so the golden files also prove the
	// kernel prints each exactly as Plan spells it.
	p := gatewayPolicy("lan0", "wan0")
	p.Zones[0].Interfaces = append(p.Zones[0].Interfaces, "wlan+")
	p.Forward = []ForwardRule{{From: ZoneLAN, To: ZoneWAN, Proto: TCP, Port: 443}, {From: ZoneLAN, To: ZoneWAN, Proto: UDP}, {From: ZoneLAN, To: ZoneLAN}}
	if err := fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	v4, v6 := save(t, tp.gw, "iptables-save"), save(t, tp.gw, "ip6tables-save")
	golden(t, "gateway.v4", v4)
	golden(t, "gateway.v6", v6)
	// The kernel prints the rules exactly as Plan writes them, so no
	// rebuild is ever needed to recognise Bastion's own chains.
	if n := len(fw.canon[IPv4]) + len(fw.canon[IPv6]); n != 0 {
		t.Errorf("%d chains read back differently from Plan's canonical form: %+v", n, fw.canon)
	}
	if err := fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(v4, save(t, tp.gw, "iptables-save")); diff != "" {
		t.Errorf("iptables-save changed by second apply (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(v6, save(t, tp.gw, "ip6tables-save")); diff != "" {
		t.Errorf("ip6tables-save changed by second apply (-want +got):\n%s", diff)
	}
	d, err := fw.Diff(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if want := "iptables: no changes\nip6tables: no changes\n"; d != want {
		t.Errorf("Diff after apply = %q, want %q", d, want)
	}
	s, err := fw.Show(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(s, "INPUT rule 1 -> BASTION-IN-") || !strings.Contains(s, "dropped packets:") {
		t.Errorf("Show:\n%s", s)
	}
	// Remove leaves the table as it was before Bastion.
	if err := fw.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		if got := save(t, tp.gw, cmd); strings.Contains(got, "BASTION") {
			t.Errorf("%s after Remove still has Bastion's rules:\n%s", cmd, got)
		}
	}
}

func TestRealDriftRepairedWithin10s(t *testing.T) {
	tp := newTopo(t)
	fw, reg := tp.firewall(t) // default interval
	ctx, cancel := context.WithCancel(context.Background())
	p := gatewayPolicy("lan0", "wan0")
	if err := fw.Apply(ctx, p); err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fw.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	want4, want6 := save(t, tp.gw, "iptables-save"), save(t, tp.gw, "ip6tables-save")

	steps := []struct {
		name string
		cmd  []string
		kind string
		fam  Family
	}{
		{"iptables -D the INPUT jump", []string{"iptables", "-D", "INPUT", "1"}, "jump_missing", IPv4},
		{"ip6tables -D a rule of Bastion's chain", nil, "chain_modified", IPv6},
		{"iptables -F Bastion's forward chain", nil, "chain_modified", IPv4},
	}
	chainOf := func(fam Family, hook string) string {
		b := tp.v4
		if fam == IPv6 {
			b = tp.v6
		}
		return mustList(t, b, hook)[0].Rule.Target()
	}
	steps[1].cmd = []string{"ip6tables", "-D", chainOf(IPv6, "INPUT"), "1"}
	steps[2].cmd = []string{"iptables", "-F", chainOf(IPv4, "FORWARD")}
	for _, s := range steps {
		before := testutilCounter(t, reg, "bastion_firewall_drift_repaired_total", s.fam.String(), s.kind)
		tp.gw.MustRun(s.cmd...)
		start := time.Now()
		saveCmd, want := "iptables-save", want4
		if s.fam == IPv6 {
			saveCmd, want = "ip6tables-save", want6
		}
		for {
			got := save(t, tp.gw, saveCmd)
			if got == want {
				break
			}
			// A rebuilt chain has a new name; compare the rules alone. The
			// counter moves just after the commit, so wait for both.
			if normalizeNames(got) == normalizeNames(want) &&
				testutilCounter(t, reg, "bastion_firewall_drift_repaired_total", s.fam.String(), s.kind) > before {
				break
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("%s: not repaired within 10s:\n%s", s.name, got)
			}
			time.Sleep(50 * time.Millisecond) // polling the kernel for the repair
		}
		t.Logf("%s: repaired after %v", s.name, time.Since(start).Round(time.Millisecond))
		if after := testutilCounter(t, reg, "bastion_firewall_drift_repaired_total", s.fam.String(), s.kind); after != before+1 {
			t.Errorf("%s: drift counter %s went %v -> %v, want +1", s.name, s.kind, before, after)
		}
		// And it enforces again.
		if got := answering(t, tp.wan, gwWAN4, time.Second); len(got) != 0 {
			t.Errorf("%s: after repair wan reaches %v", s.name, got)
		}
		want4, want6 = save(t, tp.gw, "iptables-save"), save(t, tp.gw, "ip6tables-save")
	}
}

var chainHash = regexp.MustCompile(`BASTION-(IN|FWD)-[0-9a-f]{8}`)

func normalizeNames(s string) string { return chainHash.ReplaceAllString(s, "BASTION-$1-x") }

func testutilCounter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for i, lp := range m.GetLabel() {
				if i >= len(labels) || lp.GetValue() != labels[i] {
					continue metric
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// prober keeps probing, from the lan client, the ports both reload
// policies forbid (and tcp/8883, which both allow) until stopped.
type prober struct {
	stop                      chan struct{}
	wg                        sync.WaitGroup
	probes, violations, allow atomic.Int64
	mu                        sync.Mutex
	seen                      []string
}

func startProber(t *testing.T, tp *topo) *prober {
	pr := &prober{stop: make(chan struct{})}
	forbidden := []target{{"tcp", 22}, {"tcp", 1883}, {"udp", 5683}}
	for _, host := range []string{gwLAN4, gwLAN6} {
		// Several probers per forbidden port so that every reload sees
		// probes in flight; a short timeout is enough on a veth, where an
		// open port answers in well under a millisecond.
		var targets []target
		for range 3 {
			targets = append(targets, forbidden...)
		}
		for _, f := range append(targets, target{"tcp", 8883}) {
			pr.wg.Add(1)
			go func() {
				defer pr.wg.Done()
				addr := net.JoinHostPort(host, strconv.Itoa(f.port))
				for i := 0; i < 1_000_000; i++ { // bounded; stop ends it long before
					select {
					case <-pr.stop:
						return
					default:
					}
					ok, err := tp.lan.Answers(context.Background(), f.network, addr, 50*time.Millisecond)
					if err != nil {
						t.Error(err)
						return
					}
					if f.port == 8883 {
						if ok {
							pr.allow.Add(1)
						}
						continue
					}
					pr.probes.Add(1)
					if ok {
						pr.violations.Add(1)
						pr.mu.Lock()
						if len(pr.seen) < 10 {
							pr.seen = append(pr.seen, f.network+" "+addr)
						}
						pr.mu.Unlock()
					}
				}
			}()
		}
	}
	return pr
}

func (pr *prober) halt() { close(pr.stop); pr.wg.Wait() }

func reloadPolicies() (a, b Policy) {
	a = gatewayPolicy("lan0", "wan0") // 8443, 8883, 5684
	b = a
	b.Services = []Service{
		{Name: "mqtt-tls", Proto: TCP, Port: 8883, Zones: []string{ZoneLAN}, Handshake: true},
		{Name: "coaps", Proto: UDP, Port: 5684, Zones: []string{ZoneLAN}, Handshake: true},
		{Name: "extra", Proto: TCP, Port: 9000, Zones: []string{ZoneLAN}},
		{Name: "est", Proto: UDP, Port: 5685, Zones: []string{ZoneLAN}, Handshake: true},
	}
	b.HandshakeRate = Rate{Count: 10000, Per: time.Second, Burst: 10000}
	a.HandshakeRate = b.HandshakeRate // the prober must not hit the limit
	return a, b
}

func TestRealReloadsNeverOpenForbiddenPorts(t *testing.T) {
	tp := newTopo(t)
	fw, _ := tp.firewall(t)
	ctx := context.Background()
	a, b := reloadPolicies()
	if err := fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	pr := startProber(t, tp)
	start := time.Now()
	deadline := start.Add(3 * time.Minute)
	for i := range 100 {
		p := b
		if i%2 == 1 {
			p = a
		}
		if err := fw.Apply(ctx, p); err != nil {
			pr.halt()
			t.Fatalf("reload %d: %v", i, err)
		}
		if time.Now().After(deadline) {
			pr.halt()
			t.Fatalf("100 reloads took more than 3 minutes (%d done)", i+1)
		}
	}
	elapsed := time.Since(start)
	pr.halt()
	t.Logf("100 reloads in %v (%v each); %d forbidden-port probes, %d answers from tcp/8883", elapsed, elapsed/100, pr.probes.Load(), pr.allow.Load())
	if pr.violations.Load() != 0 {
		t.Errorf("%d probes reached a port both policies forbid: %v", pr.violations.Load(), pr.seen)
	}
	if pr.probes.Load() < 100 || pr.allow.Load() == 0 {
		t.Errorf("prober too weak to mean anything: %d forbidden probes, %d allowed answers", pr.probes.Load(), pr.allow.Load())
	}
	if ok, _ := tp.lan.Answers(ctx, "tcp", net.JoinHostPort(gwLAN4, "8883"), time.Second); !ok {
		t.Error("tcp/8883 does not answer after the reloads")
	}
}

// TestRealProberCatchesNaiveReload is the control for the test above: the
// same prober, against reloads done the usual way (take the old rules
// out, put the new ones in rule by rule with go-iptables), must see the
// forbidden ports open. Otherwise a pass above would mean nothing.
func TestRealProberCatchesNaiveReload(t *testing.T) {
	tp := newTopo(t)
	a, b := reloadPolicies()
	rs := make([]Ruleset, 2)
	for i, p := range []Policy{a, b} {
		var err error
		if rs[i], err = Plan(p); err != nil {
			t.Fatal(err)
		}
	}
	ipts := newGoIPTables(t)
	if err := naiveApply(tp.gw.Name, ipts, rs[0], 0); err != nil {
		t.Fatal(err)
	}
	pr := startProber(t, tp)
	for i := 1; i <= 5 && pr.violations.Load() == 0; i++ {
		if err := naiveReload(tp.gw.Name, ipts, rs[i%2]); err != nil {
			pr.halt()
			t.Fatal(err)
		}
	}
	pr.halt()
	t.Logf("naive reloads: %d of %d forbidden-port probes answered", pr.violations.Load(), pr.probes.Load())
	if pr.violations.Load() == 0 {
		t.Error("the prober saw no forbidden port open during naive flush-and-refill reloads; it cannot be trusted")
	}
}

func TestRealForwardDenyByDefault(t *testing.T) {
	tp := newTopo(t)
	tp.gw.MustRun("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	tp.gw.MustRun("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
	tp.lan.MustRun("ip", "route", "add", "default", "via", gwLAN4)
	tp.lan.MustRun("ip", "-6", "route", "add", "default", "via", gwLAN6)
	tp.wan.ServeTCP("[::]:9100")
	tp.lan.ServeTCP("[::]:9101")
	ctx := context.Background()
	reach := func(from *tnetns.NS, host, port string) bool {
		ok, err := from.Answers(ctx, "tcp", net.JoinHostPort(host, port), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	type path struct {
		name       string
		from       *tnetns.NS
		host, port string
	}
	paths := []path{
		{"lan->wan v4", tp.lan, cliWAN4, "9100"}, {"lan->wan v6", tp.lan, cliWAN6, "9100"},
		{"wan->lan v4", tp.wan, cliLAN4, "9101"}, {"wan->lan v6", tp.wan, cliLAN6, "9101"},
	}
	check := func(stage string, want map[string]bool) {
		t.Helper()
		for _, p := range paths {
			got := reach(p.from, p.host, p.port)
			// The first packet to a new neighbour may wait for neighbour
			// discovery longer than one probe; an open path must answer
			// within a few tries, a closed one never does.
			for try := 0; !got && want[p.name] && try < 4; try++ {
				got = reach(p.from, p.host, p.port)
			}
			if got != want[p.name] {
				t.Errorf("%s: %s reachable = %v, want %v", stage, p.name, got, want[p.name])
			}
		}
	}
	check("no firewall (control)", map[string]bool{"lan->wan v4": true, "lan->wan v6": true, "wan->lan v4": true, "wan->lan v6": true})

	fw, _ := tp.firewall(t)
	p := gatewayPolicy("lan0", "wan0")
	if err := fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	check("no forward rules", map[string]bool{})

	p.Forward = []ForwardRule{{From: ZoneLAN, To: ZoneWAN, Proto: TCP, Port: 9100}}
	if err := fw.Apply(ctx, p); err != nil {
		t.Fatal(err)
	}
	check("lan->wan tcp/9100 allowed", map[string]bool{"lan->wan v4": true, "lan->wan v6": true})
}

// dialIn opens a connection from inside ns (the socket stays there).
func dialIn(t *testing.T, ns *tnetns.NS, network, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	if err := ns.Do(func() (err error) { c, err = net.DialTimeout(network, addr, 2*time.Second); return err }); err != nil {
		t.Fatalf("dial %s %s from %s: %v", network, addr, ns.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echoes reports whether one round trip on c comes back within d.
func echoes(c net.Conn, d time.Duration) bool {
	c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	buf := make([]byte, 4)
	n, err := c.Read(buf)
	return err == nil && n == 4 && string(buf) == "ping"
}

// A reload that closes a service closes the connections already open to
// it, at their next packet (TCP and UDP, v4 and v6), while a connection the
// box itself opened keeps getting its replies. With the usual "accept
// ESTABLISHED first" rule the open connections would go on until they end.
func TestRealReloadCutsOpenConnections(t *testing.T) {
	tp := newTopo(t)
	tp.gw.EchoTCP("[::]:9200")
	tp.wan.EchoTCP("[::]:9300")
	fw, _ := tp.firewall(t)
	ctx := context.Background()
	open := gatewayPolicy("lan0", "wan0")
	open.Services = append(open.Services,
		Service{Name: "echo", Proto: TCP, Port: 9200, Zones: []string{ZoneLAN}},
		Service{Name: "udp-echo", Proto: UDP, Port: 5685, Zones: []string{ZoneLAN}})
	if err := fw.Apply(ctx, open); err != nil {
		t.Fatal(err)
	}
	conns := map[string]net.Conn{
		"tcp v4": dialIn(t, tp.lan, "tcp", net.JoinHostPort(gwLAN4, "9200")),
		"tcp v6": dialIn(t, tp.lan, "tcp", net.JoinHostPort(gwLAN6, "9200")),
		"udp v4": dialIn(t, tp.lan, "udp", net.JoinHostPort(gwLAN4, "5685")),
		"udp v6": dialIn(t, tp.lan, "udp", net.JoinHostPort(gwLAN6, "5685")),
	}
	// The box's own connection out of wan (as the upstream link's is).
	out := dialIn(t, tp.gw, "tcp", net.JoinHostPort(cliWAN4, "9300"))
	check := func(stage string, want bool, first time.Duration) {
		t.Helper()
		for name, c := range conns {
			got := echoes(c, first)
			// A first packet may wait for neighbour discovery: an open
			// path gets a few tries, a closed one must never answer.
			for try := 0; want && !got && try < 3; try++ {
				got = echoes(c, time.Second)
			}
			if got != want {
				t.Errorf("%s: open %s connection echoes = %v, want %v", stage, name, got, want)
			}
		}
		if !echoes(out, 2*time.Second) {
			t.Errorf("%s: the box's own connection to wan gets no replies", stage)
		}
	}
	check("services open", true, time.Second)

	closed := open
	closed.Services = open.Services[:len(open.Services)-2]
	if err := fw.Apply(ctx, closed); err != nil {
		t.Fatal(err)
	}
	check("services closed by a reload", false, time.Second)

	if err := fw.Apply(ctx, open); err != nil {
		t.Fatal(err)
	}
	// TCP first retransmits the ping the closed policy dropped, after its
	// backed-off timeout: give the first round trip time for that. (Its
	// echo and the new one carry the same bytes.)
	check("services open again", true, 10*time.Second)
}

// refusing is a real backend whose transactions, while armed, also delete
// a rule that is not there: the kernel refuses the whole transaction, as
// it would any other failure of iptables-restore.
type refusing struct {
	Backend
	armed bool
}

func (r *refusing) Commit(ctx context.Context, ops []Op) error {
	if r.armed {
		ops = append(slices.Clip(ops), Op{Kind: OpDelete, Chain: "INPUT", Rule: Rule{"-m", "comment", "--comment", "bastion:absent", "-j", "DROP"}})
	}
	return r.Backend.Commit(ctx, ops)
}

// TestRealFailedIPv6RollsBackIPv4: when ip6tables-restore fails after
// IPv4 committed, IPv4 is back where it was by the time Apply returns,
// both at the first Apply (no rules of Bastion's) and on a reload.
func TestRealFailedIPv6RollsBackIPv4(t *testing.T) {
	tp := newTopo(t)
	v6 := &refusing{Backend: tp.v6, armed: true}
	reg := prometheus.NewRegistry()
	fw, err := New(tp.v4, v6, discard(), reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	a, b := reloadPolicies() // b opens tcp/9000 and udp/5685, a does not
	rollbacks := func() float64 {
		return testutilCounter(t, reg, "bastion_firewall_transactions_total", "iptables", "rollback")
	}

	found4, found6 := save(t, tp.gw, "iptables-save"), save(t, tp.gw, "ip6tables-save")
	if err := fw.Apply(ctx, a); err == nil || !strings.Contains(err.Error(), "iptables rolled back") {
		t.Errorf("first apply with ip6tables-restore failing = %v, want the failure and a rollback", err)
	}
	if diff := cmp.Diff(found4, save(t, tp.gw, "iptables-save")); diff != "" {
		t.Errorf("iptables-save after a failed first apply (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(found6, save(t, tp.gw, "ip6tables-save")); diff != "" {
		t.Errorf("ip6tables-save after a failed first apply (-want +got):\n%s", diff)
	}
	if got := rollbacks(); got != 1 {
		t.Errorf("transactions{iptables,rollback} = %v, want 1", got)
	}

	v6.armed = false
	if err := fw.Apply(ctx, a); err != nil {
		t.Fatal(err)
	}
	want4 := save(t, tp.gw, "iptables-save")
	v6.armed = true
	err = fw.Apply(ctx, b)
	if err == nil || !strings.Contains(err.Error(), "iptables rolled back") {
		t.Errorf("reload with ip6tables-restore failing = %v, want the failure and a rollback", err)
	}
	t.Logf("reload: %v", err)
	if diff := cmp.Diff(want4, save(t, tp.gw, "iptables-save")); diff != "" {
		t.Errorf("iptables-save after a failed reload (-want +got):\n%s", diff)
	}
	if got := rollbacks(); got != 2 {
		t.Errorf("transactions{iptables,rollback} = %v, want 2", got)
	}
	enabled := []string{"tcp/8443", "tcp/8883", "udp/5684"} // a's, not b's
	for _, host := range []string{gwLAN4, gwLAN6} {
		if diff := cmp.Diff(enabled, answering(t, tp.lan, host, time.Second)); diff != "" {
			t.Errorf("after the failed reload, %s from lan (-want +got):\n%s", host, diff)
		}
	}
}

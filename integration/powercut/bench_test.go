package powercut

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// BenchmarkFullStack compares, in one run on loopback, the whole bridged
// path with durability on
//
//	device (devicesim, MQTT 5 / TLS, client cert, QoS 1) -> bastiond process (PUBACK after fsync, pipelined per session) -> upstream link (MQTT 5, TLS 1.3, client cert) -> Mosquitto -> subscriber
//
// with the peers' own way of doing it
//
//	device (the same client) -> Mosquitto A (TLS, require_certificate, bridge MQTT 5 / TLS 1.3 / client cert) -> Mosquitto B -> subscriber
//
// Each device waits for its PUBACK before sending the next message;
// 100-byte payloads carry the send time, so latency is end to end (device
// send -> cloud subscriber). Throughput is messages delivered to the
// subscriber per second from the first send to the last arrival.
//
// Both paths are measured the same way: the cloud subscriber (benchSub)
// skips MQTT v5 properties as bytes instead of decoding them (paho's
// decoder charged the load generator ~10 µs and 26 allocations for the two
// user properties each of Bastion's messages carries); the CPU counters
// and profiles start after the device sessions are up and this process's
// heap is collected, and stop before the sessions close (50 TLS handshakes
// are not messages); the Mosquitto path runs first in every other
// scenario. The second line per gateway shows where the whole box's CPU
// went, with the load generator's allocations and GCs per phase (a
// benchmark's log is cut after 10 lines: two per gateway and scenario).
//
// Not in CI's pass/fail (no timing assertions); run it with
//
//	go test -run '^$' -bench FullStack -benchtime 1x -count 3 ./integration/powercut/
//
// BENCH_BASTIOND_BASELINE=<bastiond binary> runs a second gateway of that
// build side by side; BENCH_PROFILE_DIR=<absolute dir> writes bastiond CPU
// profiles per scenario (BASTIOND_TRACE=1: execution traces too);
// BENCH_FULLSTACK_SCALE=<factor> multiplies the messages per scenario;
// BENCH_FULLSTACK_ONLY=1pub,1pubx16,50pub,50paced runs only the scenarios named;
// BENCH_MQTT_WRITES=packet makes every device write a packet as one TLS
// record (paho.golang writes a PUBLISH in several);
// BENCH_BASTIOND_WRAP=<program> starts every bastiond (this build and the
// baseline) as "program bastiond args...", e.g. a two-line script that sets
// GOMAXPROCS=1 and execs "taskset -c 0 $@" to try a one-core router.
func BenchmarkFullStack(b *testing.B) {
	const gatewayID = "gw1"
	if os.Getenv("BENCH_PROFILE_DIR") != "" {
		runtime.MemProfileRate = 4096 // the load generator's allocations per phase, finely enough
	}
	// pubs device sessions, each with inflight QoS 1 publishes awaiting
	// their PUBACK (1 = send, wait, send; 16 = a device pipelining within
	// the receive maximum both brokers grant).
	// The paced scenario offers a fixed rate instead (rate > 0, msg/s over
	// all devices; inflight workers per device so that one slow PUBACK does
	// not hold back the schedule): its latency is measured at a load both
	// paths carry, where the closed-loop scenarios measure it at saturation,
	// where by Little's law it is the messages in flight over the throughput
	// plus whatever the busiest process's scheduling adds.
	scenarios := []struct {
		pubs, inflight, each int
		rate                 float64
	}{{1, 1, 3000, 0}, {1, 16, 6400, 0}, {50, 1, 200, 0}, {50, 8, 400, pacedRate}}
	maxPubs := 50
	// BENCH_FULLSTACK_SCALE multiplies the messages (longer runs for
	// profiles: BENCH_FULLSTACK_SCALE=5).
	if f, err := strconv.ParseFloat(os.Getenv("BENCH_FULLSTACK_SCALE"), 64); err == nil && f > 0 {
		for i := range scenarios {
			scenarios[i].each = max(scenarios[i].inflight, int(float64(scenarios[i].each)*f))
		}
	}

	cloud := mosquitto.Start(b, mosquitto.Options{Name: "cloud"})
	sub := subscribeBench(b, cloud, "bench-sub", "bastion/#")
	if os.Getenv("BENCH_DEBUG_LOGS") != "" {
		b.Cleanup(func() {
			raw, _ := os.ReadFile(cloud.LogFile)
			b.Logf("cloud log:\n%s", raw)
		})
	}

	// Bastion, its own process, upstream to the cloud broker; with
	// BENCH_BASTIOND_BASELINE=<path to another bastiond build> a second one
	// runs that build, alternating with this one in every scenario.
	gws := []*benchGateway{newBenchGateway(b, "Bastion", "", cloud, sub, gatewayID, maxPubs)}
	if base := os.Getenv("BENCH_BASTIOND_BASELINE"); base != "" {
		// Its own cloud broker: a --dev gateway's MQTT client id is fixed.
		cloud2 := mosquitto.Start(b, mosquitto.Options{Name: "cloud2"})
		sub2 := subscribeBench(b, cloud2, "bench-sub", "bastion/#")
		gws = append(gws, newBenchGateway(b, "baseline", base, cloud2, sub2, gatewayID, maxPubs))
	}

	// Mosquitto A bridging to the same cloud broker, as a Mosquitto edge
	// gateway would be set up: same TLS, same client-certificate rule.
	bridgeLeaf := cloud.CA.Client(b, "gw-mosq")
	edge := mosquitto.Start(b, mosquitto.Options{Name: "edge", CA: cloud.CA, Config: fmt.Sprintf(`
connection cloud
address %s
bridge_protocol_version mqttv50
remote_clientid gw-mosq
cleansession true
bridge_cafile %s
bridge_certfile %s
bridge_keyfile %s
bridge_tls_version tlsv1.3
bridge_insecure false
topic # out 1 devices/ bastion/%s/
`, cloud.Addr, cloud.CA.CertFile, bridgeLeaf.CertFile, bridgeLeaf.KeyFile, gatewayID)})
	mDevs := make([]*devicesim.Device, maxPubs)
	for i := range mDevs {
		id := fmt.Sprintf("m%d", i)
		l := cloud.CA.Client(b, id)
		mDevs[i] = &devicesim.Device{Creds: devicesim.Creds{ID: id, Auth: "cert", CertPEM: string(l.CertPEM), KeyPEM: string(l.KeyPEM),
			CAPEM: string(cloud.CA.CertPEM)}, ServerName: mosquitto.ServerName}
	}

	// BENCH_MQTT_WRITES=packet: every device writes a packet as one TLS
	// record (devicesim.Device.PacketWrites), on both paths.
	if os.Getenv("BENCH_MQTT_WRITES") == "packet" {
		for _, d := range mDevs {
			d.PacketWrites = true
		}
		for _, g := range gws {
			for _, d := range g.devs {
				d.PacketWrites = true
			}
		}
	}

	// Both paths must deliver before anything is timed.
	for _, g := range gws {
		probe(b, g.sub, g.cfg.MQTT.Listen, g.devs[0])
	}
	probe(b, sub, edge.Addr, mDevs[0])

	var lines []string
	only := os.Getenv("BENCH_FULLSTACK_ONLY") // e.g. "1pub,1pubx16" (names as reported)
	for i, sc := range scenarios {
		name := fmt.Sprintf("%dpub", sc.pubs)
		switch {
		case sc.rate > 0:
			name = fmt.Sprintf("%dpaced", sc.pubs)
		case sc.inflight > 1:
			name += fmt.Sprintf("x%d", sc.inflight)
		}
		if only != "" && !slices.Contains(strings.Split(only, ","), name) {
			continue
		}
		// The Mosquitto path runs first in even rounds and last in odd
		// ones, and the gateways alternate among themselves, so that no
		// path is always measured after another one's (its garbage, its
		// connections' teardown, a warmer cache).
		var m fullResult
		var ecpu time.Duration
		var mOther otherCPU
		var mRT loadRuntime
		runMosquitto := func() {
			var ecpu0, ccpu0, lcpu0, box0 time.Duration
			var segs0, sw0 int64
			var rt0 loadRuntime
			m = fullRun(b, sub, edge.Addr, mDevs[:sc.pubs], sc.inflight, sc.each, sc.rate, func(start bool) {
				if start {
					ecpu0, ccpu0, lcpu0, box0 = cpuTime(b, edge.Pid()), cpuTime(b, cloud.Pid()), cpuTime(b, os.Getpid()), boxCPU(b)
					segs0, sw0 = tcpSegs(b), switches(os.Getpid())
					rt0 = loadProfile(b, "mosquitto-"+name)
					return
				}
				mRT = rt0.done(b)
				ecpu = cpuTime(b, edge.Pid()) - ecpu0
				mOther = otherCPU{cloud: cpuTime(b, cloud.Pid()) - ccpu0, load: cpuTime(b, os.Getpid()) - lcpu0, box: boxCPU(b) - box0,
					segs: tcpSegs(b) - segs0, switches: switches(os.Getpid()) - sw0}
			})
		}
		mosquittoLast := (benchRound+i)%2 == 1
		if !mosquittoLast {
			runMosquitto()
		}
		order := slices.Clone(gws)
		if (benchRound+i)%2 == 1 {
			slices.Reverse(order)
		}
		type gwResult struct {
			gw     *benchGateway
			g      fullResult
			st     runStats
			gOther otherCPU
			gRT    loadRuntime
		}
		var results []gwResult
		for _, gw := range order {
			var ccpu0, lcpu0, box0 time.Duration
			var segs0, sw0 int64
			var rt0, gRT loadRuntime
			var gOther otherCPU
			g, st := gw.run(b, sc.pubs, sc.inflight, sc.each, sc.rate, name, func(start bool) {
				if start {
					ccpu0, lcpu0, box0 = cpuTime(b, gw.cloud.Pid()), cpuTime(b, os.Getpid()), boxCPU(b)
					segs0, sw0 = tcpSegs(b), switches(os.Getpid())
					rt0 = loadProfile(b, gw.name+"-"+name)
					return
				}
				gRT = rt0.done(b)
				gOther = otherCPU{cloud: cpuTime(b, gw.cloud.Pid()) - ccpu0, load: cpuTime(b, os.Getpid()) - lcpu0, box: boxCPU(b) - box0,
					segs: tcpSegs(b) - segs0, switches: switches(os.Getpid()) - sw0}
			})
			results = append(results, gwResult{gw, g, st, gOther, gRT})
		}
		if mosquittoLast {
			runMosquitto()
		}
		mPos := map[bool]string{false: "first", true: "last"}[mosquittoLast]
		for _, res := range results {
			gw, g, st, gOther, gRT := res.gw, res.g, res.st, res.gOther, res.gRT
			ratio := g.rate() / m.rate()
			load := fmt.Sprintf("%2d publishers × %2d in flight × %4d", sc.pubs, sc.inflight, sc.each)
			if sc.rate > 0 {
				load = fmt.Sprintf("%2d publishers paced, %.0f msg/s offered (sends > 1 ms late: %.1f%% / %.1f%%)", sc.pubs, sc.rate,
					100*float64(g.late)/float64(g.msgs), 100*float64(m.late)/float64(m.msgs))
			}
			lines = append(lines, fmt.Sprintf("%s | %s %6.0f msg/s e2e p50 %v p99 %v, PUBACK p50 %v p99 %v | Mosquitto bridge %6.0f msg/s e2e p50 %v p99 %v, PUBACK p50 %v p99 %v | throughput ratio %.2fx, e2e p99 ratio %.2fx, dups %d/%d; bastiond CPU %.0f µs/msg (%.2f cores), %.1f msgs/fsync, %.0f fsyncs/s, mean fsync %v (writer in fsync %.0f%% of the time; commits > 1 ms %.1f%%, > 5 ms %.2f%%); edge Mosquitto CPU %.0f µs/msg (%.2f cores)",
				load, gw.name, g.rate(), g.pct(g.e2e, 50), g.pct(g.e2e, 99), g.pct(g.ack, 50), g.pct(g.ack, 99),
				m.rate(), m.pct(m.e2e, 50), m.pct(m.e2e, 99), m.pct(m.ack, 50), m.pct(m.ack, 99),
				ratio, float64(g.pct(g.e2e, 99))/float64(m.pct(m.e2e, 99)), g.dups, m.dups,
				float64(st.cpu.Microseconds())/float64(g.msgs), st.cpu.Seconds()/g.elapsed.Seconds(),
				float64(g.msgs)/st.fsyncs, st.fsyncs/g.elapsed.Seconds(),
				st.meanFsync(), 100*st.fsSec/g.elapsed.Seconds(),
				100*st.over1ms/st.commits, 100*st.over5ms/st.commits,
				float64(ecpu.Microseconds())/float64(m.msgs), ecpu.Seconds()/m.elapsed.Seconds()))
			// Where the whole box's CPU went: the cloud broker, this
			// process (devices and subscriber) and everything busy.
			lines = append(lines, fmt.Sprintf("%25s CPU µs/msg: %s cloud %.0f, load generator %.0f (%s), box %.0f; TCP segments/msg %.1f, load generator scheduled in/msg %.1f | Mosquitto bridge (measured %s): cloud %.0f, load generator %.0f (%s), box %.0f; segments/msg %.1f, scheduled in/msg %.1f",
				"", gw.name, perMsg(gOther.cloud, g.msgs), perMsg(gOther.load, g.msgs), gRT.String(g.msgs), perMsg(gOther.box, g.msgs),
				float64(gOther.segs)/float64(g.msgs), float64(gOther.switches)/float64(g.msgs), mPos,
				perMsg(mOther.cloud, m.msgs), perMsg(mOther.load, m.msgs), mRT.String(m.msgs), perMsg(mOther.box, m.msgs),
				float64(mOther.segs)/float64(m.msgs), float64(mOther.switches)/float64(m.msgs)))
			prefix := "bastion"
			if gw.name != "Bastion" {
				prefix = gw.name
			}
			b.ReportMetric(g.rate(), prefix+"-msg/s-"+name)
			if sc.rate == 0 { // paced: both carry what is offered
				b.ReportMetric(ratio, prefix+"-tput-ratio-"+name)
			}
			b.ReportMetric(float64(g.pct(g.e2e, 99).Microseconds()), prefix+"-p99-µs-"+name)
			b.ReportMetric(float64(st.cpu.Microseconds())/float64(g.msgs), prefix+"-cpu-µs/msg-"+name)
		}
		b.ReportMetric(m.rate(), "mosquitto-msg/s-"+name)
		b.ReportMetric(float64(m.pct(m.e2e, 99).Microseconds()), "mosquitto-p99-µs-"+name)
	}
	benchRound++
	// Profile notes last: a benchmark's log is cut after 10 lines (-v shows all).
	for _, l := range append(lines, profNotes...) {
		b.Log(l)
	}
	profNotes = nil
	if os.Getenv("BENCH_DEBUG_LOGS") != "" {
		for _, g := range gws {
			b.Logf("%s log:\n%s", g.name, g.p.log)
		}

	}
}

// profNotes are the profiling notes of this round (BENCH_PROFILE_DIR).
var profNotes []string

// benchRound alternates which gateway goes first between -count rounds.
var benchRound int

// benchGateway is one bastiond process under benchmark with its devices.
type benchGateway struct {
	name, state string
	cfg         config.Config
	p           *proc
	cloud       *mosquitto.Broker
	sub         *benchSub // on its cloud broker
	devs        []*devicesim.Device
	profiling   bool // SIGUSR2 CPU profiles around each run
}

// newBenchGateway starts bastiond (bin, or this tree's build if empty) on a
// fresh state directory, upstream to cloud (sub subscribes there), with
// pubs devices.
func newBenchGateway(b *testing.B, name, bin string, cloud *mosquitto.Broker, sub *benchSub, gatewayID string, pubs int) *benchGateway {
	state := filepath.Join(b.TempDir(), "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		b.Fatal(err)
	}
	cfg := gwConfig(b, state, cloud, cloud.CA.CertFile, mosquitto.ServerName, cloud.CA.Client(b, gatewayID), gatewayID)
	cfg.Log.Level = "warn"
	g := &benchGateway{name: name, state: state, cfg: cfg, cloud: cloud, sub: sub}
	if bin == "" {
		bin, _ = binaries(b)
		g.profiling = os.Getenv("BENCH_PROFILE_DIR") != ""
	}
	g.p = startGatewayBin(b, bin, cfg, true)
	g.devs = make([]*devicesim.Device, pubs)
	for i := range g.devs {
		g.devs[i] = addDevice(b, state, fmt.Sprintf("b%d", i), "cert")
	}
	return g
}

// runStats is what bastiond did during one run.
type runStats struct {
	cpu           time.Duration
	fsyncs, fsSec float64
	// commits: commit fsyncs; over1ms, over5ms: of them, those that took
	// longer (bastion_queue_fsync_seconds's buckets).
	commits, over1ms, over5ms float64
}

// fsyncStats reads, in one request, the queue's fsyncs (commits and new
// segments') and bastion_queue_fsync_seconds: the time in commit fsyncs,
// the commits, and those at most 1 ms and 5 ms. A baseline build from
// before the histogram (session 10) has only the sum, under its old name;
// its commit counts are then 0 (the shares print as NaN %).
func fsyncStats(b *testing.B, state string) (fsyncs, sec, n, le1ms, le5ms float64) {
	ms := gatewayMetrics(b, state)
	fsyncs, ok := ms["bastion_queue_fsyncs_total"]
	if !ok {
		b.Fatal("no metric bastion_queue_fsyncs_total")
	}
	if _, ok := ms["bastion_queue_fsync_seconds_sum"]; !ok {
		return fsyncs, ms["bastion_queue_fsync_seconds_total"], 0, 0, 0
	}
	return fsyncs, ms["bastion_queue_fsync_seconds_sum"], ms["bastion_queue_fsync_seconds_count"],
		ms[`bastion_queue_fsync_seconds_bucket{le="0.001"}`], ms[`bastion_queue_fsync_seconds_bucket{le="0.005"}`]
}

// meanFsync is the mean commit fsync: over the commits where the
// histogram counts them, else (an old baseline) over every fsync.
func (st runStats) meanFsync() time.Duration {
	n := st.commits
	if n == 0 {
		n = st.fsyncs
	}
	return time.Duration(st.fsSec / n * float64(time.Second)).Round(time.Microsecond)
}

func (g *benchGateway) run(b *testing.B, pubs, inflight, each int, rate float64, name string, around func(start bool)) (fullResult, runStats) {
	pid := g.p.cmd.Process.Pid
	var cpu0 time.Duration
	var fs0, fsSec0, n0, le1, le5 float64
	var st runStats
	r := fullRun(b, g.sub, g.cfg.MQTT.Listen, g.devs[:pubs], inflight, each, rate, func(start bool) {
		if start {
			cpu0 = cpuTime(b, pid)
			fs0, fsSec0, n0, le1, le5 = fsyncStats(b, g.state)
			g.profile(b, fmt.Sprintf("%s-%d", name, benchRound), true)
			around(true)
			return
		}
		around(false)
		g.profile(b, fmt.Sprintf("%s-%d", name, benchRound), false)
		fs, sec, n, l1, l5 := fsyncStats(b, g.state)
		st = runStats{cpu: cpuTime(b, pid) - cpu0, fsyncs: fs - fs0, fsSec: sec - fsSec0, commits: n - n0}
		st.over1ms, st.over5ms = st.commits-(l1-le1), st.commits-(l5-le5)
	})
	return r, st
}

// profile starts or stops a CPU profile cpu-<name>.pprof in a benchprof
// build (cmd/bastiond/profile_benchprof.go: SIGUSR2 toggles, the name is
// read from cpu.name, cpu.done is written after a stop) and waits, bounded,
// for a stopped one to be written.
func (g *benchGateway) profile(b *testing.B, name string, start bool) {
	if !g.profiling {
		return
	}
	dir := os.Getenv("BENCH_PROFILE_DIR")
	done := filepath.Join(dir, "cpu.done")
	if start {
		os.Remove(done)
		if err := os.WriteFile(filepath.Join(dir, "cpu.name"), []byte(name), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	if err := g.p.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		b.Fatal(err)
	}
	if start {
		return
	}
	for deadline := time.Now().Add(time.Minute); ; {
		if _, err := os.Stat(done); err == nil {
			b.Logf("bastiond CPU profile: go tool pprof %s", filepath.Join(dir, "cpu-"+name+".pprof"))
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("no %s within 1 min (is BENCH_PROFILE_DIR absolute and writable?)", done)
		}
		time.Sleep(20 * time.Millisecond) // a file written by another process: nothing to wait on
	}
}

// probe publishes through addr until one message reaches the subscriber
// (the bridge or the upstream link may still be connecting).
func probe(b *testing.B, sub *benchSub, addr string, d *devicesim.Device) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got := make(chan struct{}, 1)
	sub.setHandler(func([]byte) {
		select {
		case got <- struct{}{}:
		default:
		}
	})
	defer sub.setHandler(nil)
	c, err := d.DialMQTT(ctx, addr, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	for {
		if rc, err := c.Publish(ctx, c.TelemetryTopic("probe"), 1, []byte("probe")); err != nil || rc != 0 {
			b.Fatalf("probe via %s: rc 0x%02x %v", addr, rc, err)
		}
		select {
		case <-got:
			return
		case <-time.After(200 * time.Millisecond): // next probe: a bridge drops what it had no connection for
		case <-ctx.Done():
			b.Fatalf("nothing sent via %s reached the cloud subscriber within 30s", addr)
		}
	}
}

// cpuTime is the user+system CPU time pid used so far (testenv.ProcCPU,
// clock ticks of 10 ms).
func cpuTime(b *testing.B, pid int) time.Duration {
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
		b.Fatal(err)
	}
	return testenv.ProcCPU(pid)
}

// otherCPU is the CPU, besides the gateway's, that one run cost.
type otherCPU struct {
	cloud, load, box time.Duration
	segs, switches   int64 // TCP segments sent box-wide; times the load generator's threads were scheduled in
}

func perMsg(d time.Duration, msgs int) float64 {
	return float64(d.Microseconds()) / float64(msgs)
}

// boxCPU is the CPU time all cores spent busy so far (/proc/stat: every
// state but idle and iowait, in clock ticks of 10 ms).
func boxCPU(b *testing.B) time.Duration {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	var busy int64
	for i, f := range strings.Fields(line)[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		v, _ := strconv.ParseInt(f, 10, 64)
		busy += v
	}
	return time.Duration(busy) * 10 * time.Millisecond
}

// tcpSegs is the TCP segments the box has sent (/proc/net/snmp OutSegs).
func tcpSegs(b *testing.B) int64 {
	n := testenv.TCPCounter("OutSegs")
	if n < 0 {
		b.Fatal("no Tcp OutSegs in /proc/net/snmp")
	}
	return n
}

// switches is how many times pid's threads were scheduled in so far
// (testenv.SchedStat): each wake after a sleep counts.
func switches(pid int) int64 {
	_, n := testenv.SchedStat(pid)
	return n
}

// metric reads one counter from bastiond's metrics on its control socket.
func metric(b *testing.B, state, name string) float64 {
	v, ok := gatewayMetrics(b, state)[name]
	if !ok {
		b.Fatalf("no metric %s", name)
	}
	return v
}

// gatewayMetrics is the gateway's metrics now, by series (name and labels as
// exposed).
func gatewayMetrics(b *testing.B, state string) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := control.New(control.SocketPath(state)).Do(ctx, "GET", "/metrics", nil, nil)
	if err != nil {
		b.Fatalf("metrics: %v", err)
	}
	m := map[string]float64{}
	for _, l := range strings.Split(string(raw), "\n") {
		i := strings.LastIndexByte(l, ' ')
		if i < 0 || strings.HasPrefix(l, "#") {
			continue
		}
		f, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			b.Fatalf("metrics: %q", l)
		}
		m[l[:i]] = f
	}
	return m
}

type fullResult struct {
	msgs     int
	elapsed  time.Duration
	e2e, ack []time.Duration
	dups     int
	late     int // paced: sends the load generator made > 1 ms after due
}

func (r fullResult) rate() float64 { return float64(r.msgs) / r.elapsed.Seconds() }

func (r fullResult) pct(l []time.Duration, p int) time.Duration {
	if len(l) == 0 {
		return 0
	}
	return l[(len(l)-1)*p/100].Round(10 * time.Microsecond)
}

// pacedRate is the offered load of the paced scenario, msg/s over its 50
// devices (200 msg/s each, more than a house of devices sends): about a
// third of what either path carries at saturation on the 2-CPU machines
// this runs on.
const pacedRate = 10000

// fullRun connects one device session per device, then each publishes each
// messages at QoS 1 with inflight publishes awaiting their PUBACK at a
// time; the subscriber measures. With rate > 0 the devices instead offer
// rate msg/s between them, evenly spaced and staggered across devices,
// with inflight workers per device: message n of a device is due at a fixed
// time and its latencies are measured from that time, not from when a
// worker got to send it, so a path that falls behind the schedule is
// charged the wait (no coordinated omission). around(true) is called once the sessions
// are up and this process's heap is collected, around(false) once the last
// message arrived, before the sessions close: what it measures is the
// messages, not the TLS handshakes and teardown of 50 sessions (which
// were inside it before, in both paths) nor the previous run's garbage.
func fullRun(b *testing.B, sub *benchSub, addr string, devs []*devicesim.Device, inflight, each int, rate float64, around func(start bool)) fullResult {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	clients := make([]*devicesim.MQTT, len(devs))
	for i, d := range devs {
		c, err := d.DialMQTT(ctx, addr, nil)
		if err != nil {
			b.Fatalf("connect %s to %s: %v", d.ID, addr, err)
		}
		clients[i] = c
	}
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	each -= each % inflight
	total := len(devs) * each
	r := fullResult{msgs: total, e2e: make([]time.Duration, 0, total)}
	// The subscriber's read goroutine measures each arrival; recvMu
	// guards r.e2e, r.dups and last against a timed-out run's reads.
	recvDone := make(chan struct{})
	var recvMu sync.Mutex
	var last time.Time
	seen := make([]bool, total)
	sub.setHandler(func(p []byte) {
		now := time.Now()
		if len(p) < 16 {
			return
		}
		id := binary.BigEndian.Uint64(p[8:])
		recvMu.Lock()
		defer recvMu.Unlock()
		if id >= uint64(total) || len(r.e2e) == total { // a late probe or duplicate after the run
			return
		}
		if seen[id] {
			r.dups++
			return
		}
		seen[id] = true
		r.e2e = append(r.e2e, now.Sub(time.Unix(0, int64(binary.BigEndian.Uint64(p)))))
		last = now
		if len(r.e2e) == total {
			close(recvDone)
		}
	})
	defer sub.setHandler(nil)
	var mu sync.Mutex
	var wg sync.WaitGroup
	var late atomic.Int64 // paced sends that left > 1 ms after they were due
	errs := make(chan error, len(devs)*inflight)
	runtime.GC()
	around(true)
	start := time.Now()
	per := each / inflight
	// due is when worker k of device i sends its n-th message: now in a
	// closed loop; on the schedule when paced (device i's messages every
	// len(devs)/rate, device i offset by i/rate, worker k taking every
	// inflight-th).
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(len(devs)) / rate * float64(time.Second))
	}
	due := func(i, k, n int) time.Time {
		if rate == 0 {
			return time.Now()
		}
		return start.Add(time.Duration(i)*interval/time.Duration(len(devs)) + time.Duration(n*inflight+k)*interval)
	}
	for i, c := range clients {
		for k := range inflight {
			wg.Add(1)
			go func() {
				defer wg.Done()
				topic := c.TelemetryTopic("n")
				payload := make([]byte, 100)
				acks := make([]time.Duration, 0, per)
				for n := range per {
					binary.BigEndian.PutUint64(payload[8:], uint64(i*each+k*per+n))
					t0 := due(i, k, n)
					if d := time.Until(t0); d > 0 {
						time.Sleep(d)
					} else if rate > 0 && -d > time.Millisecond {
						late.Add(1)
					}
					binary.BigEndian.PutUint64(payload, uint64(t0.UnixNano()))
					if rc, err := c.Publish(ctx, topic, 1, payload); err != nil || rc != 0 {
						errs <- fmt.Errorf("publish %d via %s: rc 0x%02x %v", n, addr, rc, err)
						return
					}
					acks = append(acks, time.Since(t0))
				}
				mu.Lock()
				r.ack = append(r.ack, acks...)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	select {
	case <-recvDone:
	case <-ctx.Done():
	}
	around(false)
	sub.setHandler(nil)
	recvMu.Lock()
	defer recvMu.Unlock()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	if len(r.e2e) < total {
		b.Fatalf("via %s the subscriber got %d of %d", addr, len(r.e2e), total)
	}
	r.elapsed = last.Sub(start)
	r.late = int(late.Load())
	slices.Sort(r.e2e)
	slices.Sort(r.ack)
	return r
}

// loadRuntime is what this process's Go runtime did during one run: the
// load generator's own cost, so that the two paths' can be compared.
type loadRuntime struct {
	allocs, gcs uint64
	profile     *os.File
	name        string // of the heap profiles before and after
	label       string
	mono        float64 // CLOCK_MONOTONIC at the start, seconds
}

// monotonic is CLOCK_MONOTONIC in seconds, the clock perf's -k
// CLOCK_MONOTONIC stamps samples with.
func monotonic() float64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}

// writeHeap writes this process's heap profile (its alloc_objects count
// every allocation so far, sampled at runtime.MemProfileRate).
func writeHeap(b *testing.B, path string) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

// loadProfile snapshots the runtime counters and, with BENCH_PROFILE_DIR,
// starts a CPU profile of this process (loadgen-<name>-<round>.pprof).
func loadProfile(b *testing.B, name string) loadRuntime {
	var r loadRuntime
	if dir := os.Getenv("BENCH_PROFILE_DIR"); dir != "" {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("loadgen-%s-%d.pprof", name, benchRound)))
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		r.profile = f
		r.mono = monotonic()
		r.label = name
		r.name = filepath.Join(dir, fmt.Sprintf("loadgen-allocs-%s-%d", name, benchRound))
		writeHeap(b, r.name+"-before.pprof")
	}
	r.allocs, r.gcs = runtimeCounters()
	return r
}

// done stops the profile and returns the counters' increase.
func (r loadRuntime) done(b *testing.B) loadRuntime {
	allocs, gcs := runtimeCounters()
	if r.profile != nil {
		pprof.StopCPUProfile()
		if err := r.profile.Close(); err != nil {
			b.Fatal(err)
		}
		writeHeap(b, r.name+"-after.pprof")
		profNotes = append(profNotes, fmt.Sprintf("%s: CLOCK_MONOTONIC %.6f,%.6f (perf record -k CLOCK_MONOTONIC; perf report --time a,b); load generator CPU profile: go tool pprof %s; allocations: go tool pprof -sample_index alloc_objects -diff_base %[4]s-before.pprof %[4]s-after.pprof",
			r.label, r.mono, monotonic(), r.profile.Name(), r.name))
	}
	return loadRuntime{allocs: allocs - r.allocs, gcs: gcs - r.gcs}
}

func (r loadRuntime) String(msgs int) string {
	return fmt.Sprintf("%.1f allocs/msg, %d GCs", float64(r.allocs)/float64(msgs), r.gcs)
}

func runtimeCounters() (allocs, gcs uint64) {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:objects"}, {Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64(), s[1].Value.Uint64()
}

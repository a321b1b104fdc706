package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

// result of one load run.
type result struct {
	msgs    int
	elapsed time.Duration
	lat     []time.Duration // QoS 1: publish → PUBACK
	cpu     time.Duration   // the broker's CPU time during the run
	// client is the load generator's (this process's) CPU time during the
	// run: the same client code for both brokers, so a difference is what
	// the broker's behaviour costs its peer (wake-ups, TCP window, ...).
	client time.Duration
	// slices is how many times the broker's threads were scheduled in.
	slices int64
	// segs is InSegs + OutSegs of this network namespace during the run
	// (on loopback each segment is in both).
	segs int64
}

// segsPerMsg is segs per message, halved: on loopback each segment is
// counted once sent and once received.
func (r result) segsPerMsg() float64 { return float64(r.segs) / 2 / float64(r.msgs) }

// slicesPerMsg is how often the broker's threads were scheduled in per
// message.
func (r result) slicesPerMsg() float64 { return float64(r.slices) / float64(r.msgs) }

// clientPerMsg is the load generator's CPU time per message in µs.
func (r result) clientPerMsg() float64 { return float64(r.client.Microseconds()) / float64(r.msgs) }

// selfCPU is this process's user + system CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuPerMsg is the broker's CPU time per message in µs.
func (r result) cpuPerMsg() float64 { return float64(r.cpu.Microseconds()) / float64(r.msgs) }

func (r result) rate() float64 { return float64(r.msgs) / r.elapsed.Seconds() }
func (r result) p99() time.Duration {
	if len(r.lat) == 0 {
		return 0
	}
	slices.Sort(r.lat)
	return r.lat[(len(r.lat)-1)*99/100]
}

// mqttLoad connects pubs clients, then each publishes per messages of 100
// bytes with qos. QoS 0 ends with a QoS 1 publish as a fence: both brokers
// handle a connection's packets in order, so its PUBACK means every QoS 0
// message before it was processed.
func mqttLoad(b *testing.B, addr string, pid int, devs []*devicesim.Device, per int, qos byte) result {
	r, err := mqttLoadOnce(b, addr, pid, devs, per, qos)
	if err != nil {
		b.Fatalf("load against %s: %v", addr, err)
	}
	return r
}

func mqttLoadOnce(b *testing.B, addr string, pid int, devs []*devicesim.Device, per int, qos byte) (result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clients := make([]publisher, len(devs))
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.Close()
			}
		}
	}()
	for i, d := range devs {
		c, err := dialPublisher(ctx, d, addr)
		if err != nil {
			return result{}, fmt.Errorf("connect %d to %s: %v", i, addr, err)
		}
		clients[i] = c
	}
	payload := make([]byte, 100)
	var mu sync.Mutex
	var lat []time.Duration
	var firstErr error
	var wg sync.WaitGroup
	_, sl0 := testenv.SchedStat(pid)
	seg0 := testenv.TCPCounter("InSegs", "OutSegs")
	cpu0, self0 := cpuTime(pid), selfCPU()
	start := time.Now()
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "devices/" + devs[i].ID + "/t/bench"
			my := make([]time.Duration, 0, per)
			for n := 0; n < per && ctx.Err() == nil; n++ {
				t0 := time.Now()
				rc, err := c.Publish(ctx, topic, qos, payload)
				if err != nil || rc >= 0x80 {
					mu.Lock()
					var session error
					if m, ok := c.(*devicesim.MQTT); ok {
						session = m.Err()
					}
					firstErr = fmt.Errorf("publish %d: %v rc %#x (session: %v)", n, err, rc, session)
					mu.Unlock()
					return
				}
				if qos == 1 {
					my = append(my, time.Since(t0))
				}
			}
			if qos == 0 {
				if _, err := c.Publish(ctx, topic, 1, payload); err != nil {
					mu.Lock()
					firstErr = fmt.Errorf("fence: %v", err)
					mu.Unlock()
				}
			}
			mu.Lock()
			lat = append(lat, my...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return result{msgs: per * len(clients), elapsed: time.Since(start), lat: lat, cpu: cpuTime(pid) - cpu0, client: selfCPU() - self0, slices: func() int64 { _, n := testenv.SchedStat(pid); return n - sl0 }(), segs: testenv.TCPCounter("InSegs", "OutSegs") - seg0}, firstErr
}

// mqttRounds counts load rounds in this test binary, to alternate who goes
// first.
var mqttRounds atomic.Int64

// BenchmarkMQTTvsMosquitto: MQTT over TLS with client certificates, 100-byte
// payloads, QoS 0 and 1, 1 and 50 publishers, Bastion and Mosquitto 2 in the
// same run; QoS 0 from one publisher also with mosquitto_pub as the client
// (qos0/pubs1/mosquitto_pub). Reported: msg/s for both, the throughput ratio (Bastion /
// Mosquitto, goal ≥ 1) and for QoS 1 the p99 PUBACK latency ratio (goal ≤ 1).
// BENCH_BASTIOND_BASELINE=<path to another bastiond build> runs that build
// too, in the same rounds, and reports this / baseline.
func BenchmarkMQTTvsMosquitto(b *testing.B) {
	raiseNoFile(b, 65536)
	bs := startBastion(b)
	ca := newTestCA(b)
	mosq, mosqPid := startMosquitto(b, ca)
	bPid := bs.cmd.Process.Pid
	const maxPubs = 50
	bDevs := bs.addDevices(b, "mq", "cert", maxPubs)
	mDevs := make([]*devicesim.Device, maxPubs)
	for i := range mDevs {
		c, k := ca.issue(b, fmt.Sprintf("m%d", i), false)
		mDevs[i] = &devicesim.Device{Creds: devicesim.Creds{ID: fmt.Sprintf("m%d", i), Auth: "cert", CertPEM: c, KeyPEM: k, CAPEM: ca.pem}}
	}
	// Same TLS on both sides, or the comparison measures the cipher.
	bv, bsuite := tlsParams(b, bs.addrs["mqtts"], bDevs[0])
	mv, ms := tlsParams(b, mosq, mDevs[0])
	if bv != mv || bsuite != ms {
		b.Fatalf("TLS differs: Bastion %s %s, Mosquitto %s %s", tls.VersionName(bv), tls.CipherSuiteName(bsuite), tls.VersionName(mv), tls.CipherSuiteName(ms))
	}
	b.Logf("both: %s %s, client certificates; client writes a packet in one TLS record: %v (BENCH_MQTT_WRITES=packet)", tls.VersionName(bv), tls.CipherSuiteName(bsuite), packetWrites())
	// BENCH_BASTIOND_BASELINE=<another bastiond build>: it runs too, in the
	// same rounds, for this build / baseline ratios.
	var base *bastion
	var baseDevs []*devicesim.Device
	if bin := os.Getenv("BENCH_BASTIOND_BASELINE"); bin != "" {
		base = startBastionBin(b, bin)
		baseDevs = base.addDevices(b, "mq", "cert", maxPubs)
	}
	// QoS 0 from one device with Mosquitto's own client as the load
	// generator: paho.golang writes a PUBLISH as three TLS records, which
	// makes the client, not the broker, the bottleneck (mqttclient_test.go).
	if pub, err := exec.LookPath("mosquitto_pub"); err != nil {
		b.Logf("qos0/pubs1/mosquitto_pub skipped: %v (Debian package mosquitto-clients; scripts/bench installs it)", err)
	} else {
		const n = 100000
		lines := filepath.Join(b.TempDir(), "lines")
		if err := os.WriteFile(lines, bytes.Repeat(append(bytes.Repeat([]byte{'x'}, 100), '\n'), n), 0o600); err != nil {
			b.Fatal(err)
		}
		b.Run("qos0/pubs1/mosquitto_pub", func(b *testing.B) {
			for range b.N {
				var g, m result
				runs := []func(){
					func() {
						before := bs.mqttTelemetry(b)
						g = mosquittoPubLoad(b, pub, bs.addrs["mqtts"], bPid, bDevs[0], lines, n)
						if got := bs.mqttTelemetry(b) - before; got != n {
							b.Fatalf("Bastion accepted %d of mosquitto_pub's %d messages", got, n)
						}
					},
					func() { m = mosquittoPubLoad(b, pub, mosq, mosqPid, mDevs[0], lines, n) },
				}
				r := int(mqttRounds.Add(1))
				for i := range runs {
					runs[(r+i)%len(runs)]()
				}
				reportVsMosquitto(b, fmt.Sprintf("QoS 0, 1 mosquitto_pub × %d msgs", n), g, m)
			}
		})
	}
	for _, qos := range []byte{0, 1} {
		for _, pubs := range []int{1, 50} {
			// Totals long enough (0.5–2 s a run here) that one scheduler
			// hiccup on a shared machine does not decide the ratio.
			per := map[byte]int{0: 100000, 1: 40000}[qos] / pubs
			if pubs == 1 {
				per = map[byte]int{0: 100000, 1: 10000}[qos]
			}
			// BENCH_MQTT_SCALE multiplies the messages (longer runs for
			// profiles: BENCH_MQTT_SCALE=10).
			if f, err := strconv.ParseFloat(os.Getenv("BENCH_MQTT_SCALE"), 64); err == nil && f > 0 {
				per = max(1, int(float64(per)*f))
			}
			b.Run(fmt.Sprintf("qos%d/pubs%d", qos, pubs), func(b *testing.B) {
				for range b.N {
					var g, m, bl result
					runs := []func(){
						func() {
							bs.cpuProfile(b, fmt.Sprintf("qos%d-pubs%d", qos, pubs), func() {
								g = mqttLoad(b, bs.addrs["mqtts"], bPid, bDevs[:pubs], per, qos)
							})
						},
						func() { m = mqttLoad(b, mosq, mosqPid, mDevs[:pubs], per, qos) },
					}
					if base != nil {
						runs = append(runs, func() {
							bl = mqttLoad(b, base.addrs["mqtts"], base.cmd.Process.Pid, baseDevs[:pubs], per, qos)
						})
					}
					// Rotate who goes first (over -count and b.N) so that
					// none always runs on the warmer or the quieter machine.
					r := int(mqttRounds.Add(1))
					for i := range runs {
						runs[(r+i)%len(runs)]()
					}
					if base != nil {
						b.ReportMetric(bl.rate()/m.rate(), "baseline_throughput_ratio")
						b.ReportMetric(g.rate()/bl.rate(), "this/baseline")
						b.Logf("QoS %d, %d publishers: baseline %.0f msg/s p99 %v cpu %.1f µs/msg client cpu %.1f µs/msg TCP segments %.2f /msg, ratio to Mosquitto %.2f, p99 ratio %.2f | this / baseline: throughput %.2f, cpu %.2f",
							qos, pubs, bl.rate(), bl.p99(), bl.cpuPerMsg(), bl.clientPerMsg(), bl.segsPerMsg(), bl.rate()/m.rate(), float64(bl.p99())/float64(m.p99()), g.rate()/bl.rate(), g.cpuPerMsg()/bl.cpuPerMsg())
					}
					reportVsMosquitto(b, fmt.Sprintf("QoS %d, %d publishers × %d msgs", qos, pubs, per), g, m)
				}
			})
		}
	}
}

// reportVsMosquitto reports one round of Bastion (g) against Mosquitto
// (m), what the load was: their rates and ratio, CPU per message of both
// brokers and of the client against each, TCP segments per message, and
// with latencies (QoS 1) the p99s and their ratio.
func reportVsMosquitto(b *testing.B, what string, g, m result) {
	b.ReportMetric(g.rate(), "bastion_msg/s")
	b.ReportMetric(m.rate(), "mosquitto_msg/s")
	b.ReportMetric(g.rate()/m.rate(), "throughput_ratio")
	b.ReportMetric(g.cpuPerMsg(), "bastion_cpu_µs/msg")
	b.ReportMetric(m.cpuPerMsg(), "mosquitto_cpu_µs/msg")
	b.ReportMetric(g.clientPerMsg(), "client_cpu_µs/msg_bastion")
	b.ReportMetric(m.clientPerMsg(), "client_cpu_µs/msg_mosquitto")
	b.ReportMetric(g.segsPerMsg(), "tcp_segs/msg_bastion")
	b.ReportMetric(m.segsPerMsg(), "tcp_segs/msg_mosquitto")
	if len(g.lat) > 0 && len(m.lat) > 0 {
		b.ReportMetric(float64(g.p99().Microseconds()), "bastion_p99_µs")
		b.ReportMetric(float64(m.p99().Microseconds()), "mosquitto_p99_µs")
		b.ReportMetric(float64(g.p99())/float64(m.p99()), "p99_ratio")
	}
	b.Logf("%s: Bastion %.0f msg/s p99 %v cpu %.1f µs/msg | Mosquitto %.0f msg/s p99 %v cpu %.1f µs/msg | ratio %.2f, cpu ratio %.2f | client cpu %.1f vs %.1f µs/msg | broker scheduled in %.2f vs %.2f /msg | TCP segments %.2f vs %.2f /msg",
		what, g.rate(), g.p99(), g.cpuPerMsg(), m.rate(), m.p99(), m.cpuPerMsg(), g.rate()/m.rate(), g.cpuPerMsg()/m.cpuPerMsg(), g.clientPerMsg(), m.clientPerMsg(), g.slicesPerMsg(), m.slicesPerMsg(), g.segsPerMsg(), m.segsPerMsg())
}

// tlsParams returns the TLS version and cipher suite dev negotiates with
// the broker at addr.
func tlsParams(b *testing.B, addr string, dev *devicesim.Device) (uint16, uint16) {
	cfg, err := dev.TLSConfig(addr)
	if err != nil {
		b.Fatal(err)
	}
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		b.Fatalf("TLS to %s: %v", addr, err)
	}
	defer c.Close()
	st := c.ConnectionState()
	return st.Version, st.CipherSuite
}

// mosquittoPubLoad publishes n QoS 0 messages of 100 bytes as dev with
// Mosquitto's own client, mosquitto_pub -l (a line each; libmosquitto
// writes each PUBLISH with one SSL_write, as device clients do), to the
// broker at addr whose process is pid. A broker handles a connection's
// packets in order, and mosquitto_pub ends once it has written the last,
// so the run ends when the broker has stopped running after mosquitto_pub
// exited: its threads' CPU time (schedstat, ns) unchanged for 5 ms, the
// end being when it last changed. The client's CPU is mosquitto_pub's.
func mosquittoPubLoad(b *testing.B, bin, addr string, pid int, dev *devicesim.Device, lines string, n int) result {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			b.Fatal(err)
		}
		return p
	}
	in, err := os.Open(lines)
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := child.DieWithTest(exec.CommandContext(ctx, bin, "-h", host, "-p", port, "--cafile", file("ca.pem", dev.CAPEM),
		"--cert", file("c.pem", dev.CertPEM), "--key", file("k.pem", dev.KeyPEM), "-i", dev.ID,
		"-V", "mqttv311", "-q", "0", "-t", "devices/"+dev.ID+"/t/bench", "-l"))
	cmd.Stdin = in
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	_, sl0 := testenv.SchedStat(pid)
	seg0 := testenv.TCPCounter("InSegs", "OutSegs")
	cpu0 := cpuTime(pid)
	start := time.Now()
	if err := cmd.Run(); err != nil {
		b.Fatalf("mosquitto_pub to %s: %v\n%s", addr, err, out.String())
	}
	last, lastAt := cpuTime(pid), time.Now()
	for quiet := time.Now().Add(30 * time.Second); time.Since(lastAt) < 5*time.Millisecond; {
		if time.Now().After(quiet) {
			b.Fatalf("broker %s still running 30 s after mosquitto_pub ended", addr)
		}
		time.Sleep(500 * time.Microsecond)
		if c := cpuTime(pid); c != last {
			last, lastAt = c, time.Now()
		}
	}
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	_, sl := testenv.SchedStat(pid)
	return result{msgs: n, elapsed: lastAt.Sub(start), cpu: last - cpu0,
		client: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), slices: sl - sl0,
		segs: testenv.TCPCounter("InSegs", "OutSegs") - seg0}
}

var telemetryRe = regexp.MustCompile(`bastion_transport_messages_total\{kind="telemetry",transport="mqtt"\} (\d+)`)

// mqttTelemetry is how many MQTT messages from devices the gateway has
// accepted.
func (bs *bastion) mqttTelemetry(b *testing.B) int {
	m := telemetryRe.FindSubmatch(bs.metricsText(b))
	if m == nil {
		return 0 // none yet
	}
	v, _ := strconv.Atoi(string(m[1]))
	return v
}

package bench

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

// startLibcoap runs libcoap's example server with a PSK (it answers PUT on
// /example_data by storing the payload, the nearest thing to Bastion's
// telemetry POST).
func startLibcoap(b *testing.B, key string) (addr string, pid int) {
	bin := testenv.RequireCommand(b, "coap-server-openssl")
	port := testenv.FreePort(b, "udp")
	// libcoap listens for DTLS on port+1.
	for {
		c, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port+1))
		if err == nil {
			c.Close()
			break
		}
		port = testenv.FreePort(b, "udp")
	}
	cmd := child.DieWithTest(exec.Command(bin, "-A", "127.0.0.1", "-p", fmt.Sprint(port), "-k", key, "-v", "0"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	pid = cmd.Process.Pid
	addr = fmt.Sprintf("127.0.0.1:%d", port+1)
	// Ready once a handshake completes.
	d := &devicesim.Device{Creds: devicesim.Creds{ID: "probe", Auth: "psk", PSKIdentity: "probe", PSK: hex.EncodeToString([]byte(key))}}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := d.DialCoAP(ctx, addr)
		cancel()
		if err == nil {
			c.Close()
			return addr, pid
		}
		if time.Now().After(deadline) {
			b.Fatalf("coap-server-openssl not answering: %v\n%s", err, out.String())
		}
	}
}

// coapLoad runs clients sessions, each doing per confirmable requests.
func coapLoad(b *testing.B, addr string, devs []*devicesim.Device, per int, do func(context.Context, *devicesim.CoAP) error) result {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cs := make([]*devicesim.CoAP, len(devs))
	for i, d := range devs {
		c, err := d.DialCoAP(ctx, addr)
		if err != nil {
			b.Fatalf("dtls to %s: %v", addr, err)
		}
		cs[i] = c
		defer c.Close()
	}
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	start := time.Now()
	for _, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			my := make([]time.Duration, 0, per)
			for range per {
				t0 := time.Now()
				if err := do(ctx, c); err != nil {
					b.Error(err)
					return
				}
				my = append(my, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, my...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return result{msgs: per * len(cs), elapsed: time.Since(start), lat: lat}
}

// handshakes does n DTLS PSK handshakes, conc at a time (below Bastion's
// per-source limit of 8), and returns handshakes per second.
func handshakes(b *testing.B, addr string, d *devicesim.Device, n, conc int) float64 {
	cfg, err := d.DTLSConfig(addr)
	if err != nil {
		b.Fatal(err)
	}
	raddr, _ := net.ResolveUDPAddr("udp", addr)
	var wg sync.WaitGroup
	sem := make(chan struct{}, conc)
	start := time.Now()
	for range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := piondtls.Dial("udp", raddr, cfg)
			if err == nil {
				err = c.HandshakeContext(ctx)
				c.Close()
			}
			if err != nil {
				b.Errorf("handshake with %s: %v", addr, err)
			}
		}()
	}
	wg.Wait()
	return float64(n) / time.Since(start).Seconds()
}

// BenchmarkCoAPvsLibcoap: CoAP over DTLS 1.2 with PSK, Bastion against
// libcoap's coap-server-openssl in the same run, the same client (pion/dtls
// + go-coap) for both. Request/response: confirmable POST /t/bench on
// Bastion (telemetry into the Sink), PUT /example_data on libcoap, 16-byte
// payloads, 1 and 10 sessions. Handshakes: full PSK handshakes per second,
// 4 at a time. Ratios are Bastion / libcoap (goal ≥ 1; p99 goal ≤ 1).
func BenchmarkCoAPvsLibcoap(b *testing.B) {
	bs := startBastion(b)
	const key = "bench-psk-key-16"
	lc, lcPid := startLibcoap(b, key)
	// BENCH_COAP_REQUESTS: requests per round (default 4000), so a round
	// lasts long enough to rise above this shared machine's noise.
	total := 4000
	if v, err := strconv.Atoi(os.Getenv("BENCH_COAP_REQUESTS")); err == nil && v > 0 {
		total = v
	}
	bDevs := bs.addDevices(b, "co", "psk", 10)
	lDevs := make([]*devicesim.Device, 10)
	for i := range lDevs {
		lDevs[i] = &devicesim.Device{Creds: devicesim.Creds{ID: fmt.Sprintf("l%d", i), Auth: "psk", PSKIdentity: fmt.Sprintf("l%d", i), PSK: hex.EncodeToString([]byte(key))}}
	}
	payload := []byte("0123456789abcdef")
	bDo := func(ctx context.Context, c *devicesim.CoAP) error {
		r, err := c.Publish(ctx, "bench", payload)
		if err == nil && r.Code != codes.Changed {
			err = fmt.Errorf("bastion answered %v", r.Code)
		}
		return err
	}
	lDo := func(ctx context.Context, c *devicesim.CoAP) error {
		r, err := c.Do(ctx, codes.PUT, "/example_data", payload, 0)
		if err == nil && r.Code != codes.Changed && r.Code != codes.Created {
			err = fmt.Errorf("libcoap answered %v", r.Code)
		}
		return err
	}
	for _, sessions := range []int{1, 10} {
		b.Run(fmt.Sprintf("request/sessions%d", sessions), func(b *testing.B) {
			per := total / sessions
			for range b.N {
				lc0, lcl0 := testenv.ProcCPU(lcPid), selfCPU()
				l := coapLoad(b, lc, lDevs[:sessions], per, lDo)
				lcCPU, lcClient := testenv.ProcCPU(lcPid)-lc0, selfCPU()-lcl0
				var g result
				var gCPU, gClient time.Duration
				bs.cpuProfile(b, fmt.Sprintf("coap-sessions%d", sessions), func() {
					g0, gcl0 := testenv.ProcCPU(bs.cmd.Process.Pid), selfCPU()
					g = coapLoad(b, bs.addrs["coaps_psk"], bDevs[:sessions], per, bDo)
					gCPU, gClient = testenv.ProcCPU(bs.cmd.Process.Pid)-g0, selfCPU()-gcl0
				})
				// Server CPU per request: unlike the rate, it hardly depends
				// on what else the machine is doing.
				gus, lus := float64(gCPU.Microseconds())/float64(g.msgs), float64(lcCPU.Microseconds())/float64(l.msgs)
				b.ReportMetric(gus, "bastion_cpu_us/req")
				b.ReportMetric(lus, "libcoap_cpu_us/req")
				b.ReportMetric(g.rate(), "bastion_req/s")
				b.ReportMetric(l.rate(), "libcoap_req/s")
				b.ReportMetric(g.rate()/l.rate(), "throughput_ratio")
				b.ReportMetric(float64(g.p99())/float64(l.p99()), "p99_ratio")
				// The client (this process) shares the box: what it spends
				// per request against each server is part of the ratio.
				gcl, lcl := float64(gClient.Microseconds())/float64(g.msgs), float64(lcClient.Microseconds())/float64(l.msgs)
				b.ReportMetric(gcl, "client_cpu_us/req_bastion")
				b.ReportMetric(lcl, "client_cpu_us/req_libcoap")
				b.Logf("%d sessions × %d requests: Bastion %.0f req/s p99 %v | libcoap %.0f req/s p99 %v | ratio %.2f | server CPU per request: Bastion %.1f µs, libcoap %.1f µs | client CPU per request %.1f vs %.1f µs",
					sessions, per, g.rate(), g.p99(), l.rate(), l.p99(), g.rate()/l.rate(), gus, lus, gcl, lcl)
			}
		})
	}
	// BENCH_COAP_HANDSHAKES: handshakes per round (default 500); more give
	// a CPU profile enough samples.
	nHS := 500
	if v, err := strconv.Atoi(os.Getenv("BENCH_COAP_HANDSHAKES")); err == nil && v > 0 {
		nHS = v
	}
	// BENCH_BASTIOND_BASELINE=<another bastiond build>: it runs the
	// handshakes too, in the same rounds, for this build / baseline.
	var base *bastion
	var baseDev *devicesim.Device
	// BENCH_BASELINE_GOGC=<n>: the baseline runs with GOGC=n (the same
	// build as this one, say, to see what the garbage collector costs).
	if bin := os.Getenv("BENCH_BASTIOND_BASELINE"); bin != "" {
		var env []string
		if v := os.Getenv("BENCH_BASELINE_GOGC"); v != "" {
			env = append(env, "GOGC="+v)
		}
		base = startBastionBin(b, bin, env...)
		baseDev = base.addDevices(b, "cb", "psk", 1)[0]
	}
	b.Run("handshakes", func(b *testing.B) {
		for range b.N {
			var l, g, bl float64
			var lcCPU, gCPU, blCPU time.Duration
			// The client's CPU (this process) against each server.
			var lcSelf, gSelf time.Duration
			runs := []func(){
				func() {
					lc0, s0 := testenv.ProcCPU(lcPid), selfCPU()
					l = handshakes(b, lc, lDevs[0], nHS, 4)
					lcCPU, lcSelf = testenv.ProcCPU(lcPid)-lc0, selfCPU()-s0
				},
				func() {
					bs.cpuProfile(b, "coap-handshakes", func() {
						g0, s0 := testenv.ProcCPU(bs.cmd.Process.Pid), selfCPU()
						g = handshakes(b, bs.addrs["coaps_psk"], bDevs[0], nHS, 4)
						gCPU, gSelf = testenv.ProcCPU(bs.cmd.Process.Pid)-g0, selfCPU()-s0
					})
				},
			}
			if base != nil {
				runs = append(runs, func() {
					b0 := testenv.ProcCPU(base.cmd.Process.Pid)
					bl = handshakes(b, base.addrs["coaps_psk"], baseDev, nHS, 4)
					blCPU = testenv.ProcCPU(base.cmd.Process.Pid) - b0
				})
			}
			// Rotate who goes first, as the MQTT benchmark does.
			r := int(mqttRounds.Add(1))
			for i := range runs {
				runs[(r+i)%len(runs)]()
			}
			gus, lus := float64(gCPU.Microseconds())/float64(nHS), float64(lcCPU.Microseconds())/float64(nHS)
			b.ReportMetric(gus, "bastion_cpu_us/hs")
			b.ReportMetric(lus, "libcoap_cpu_us/hs")
			b.ReportMetric(g, "bastion_hs/s")
			b.ReportMetric(l, "libcoap_hs/s")
			b.ReportMetric(g/l, "ratio")
			gcs, lcs := float64(gSelf.Microseconds())/float64(nHS), float64(lcSelf.Microseconds())/float64(nHS)
			b.ReportMetric(gcs, "client_cpu_us/hs_bastion")
			b.ReportMetric(lcs, "client_cpu_us/hs_libcoap")
			b.Logf("PSK handshakes: Bastion %.0f/s | libcoap %.0f/s | ratio %.2f | server CPU per handshake: Bastion %.0f µs, libcoap %.0f µs | client CPU per handshake %.0f vs %.0f µs", g, l, g/l, gus, lus, gcs, lcs)
			if base != nil {
				bus := float64(blCPU.Microseconds()) / float64(nHS)
				b.ReportMetric(bus, "baseline_cpu_us/hs")
				b.ReportMetric(bl/l, "baseline_ratio")
				b.Logf("baseline: %.0f/s, ratio to libcoap %.2f, server CPU per handshake %.0f µs | this / baseline: rate %.2f, CPU %.2f", bl, bl/l, bus, g/bl, gus/bus)
			}
		}
	})
}

package powercut

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// BenchmarkCoAPDurable measures bastiond's CPU per confirmable CoAP
// telemetry request with durability on:
//
//	device (devicesim, CoAP over DTLS, PSK, CON POST /t/...) -> bastiond process (2.04 only after the durable queue's fsync) -> upstream link -> Mosquitto
//
// Every request is answered only after the group commit that covers it;
// the answer is deferred (otacache's Defer) and given from the queue's
// callback (bridges/coap durable.go). The figure is bastiond's user +
// system CPU (/proc/pid/stat) from the first request until the queue has
// handed every message upstream, divided by the requests: it includes the
// forwarding, and hardly depends on what else the shared machine runs,
// unlike the rate, which is printed too. Not in CI's pass/fail (no timing
// assertions); run it, with the old build side by side, as
//
//	git archive main | tar -x -C /tmp/base && (cd /tmp/base && go build -o /tmp/base/bastiond ./cmd/bastiond)
//	BENCH_BASTIOND_BASELINE=/tmp/base/bastiond go test -run '^$' -bench CoAPDurable -benchtime 1x -count 3 ./integration/powercut/
//
// (BENCH_COAP_SCALE=<factor> multiplies the requests per scenario.)
// The two gateways take turns in every scenario (the order alternates).
func BenchmarkCoAPDurable(b *testing.B) {
	// devs sessions, each with inflight confirmable requests outstanding
	// (1: send, wait for the answer, send, as devicesim's go-coap client
	// does; 16: a device pipelining, sent datagram by datagram).
	scenarios := []struct{ devs, inflight, total int }{{1, 1, 4000}, {1, 16, 20000}, {50, 1, 20000}}
	maxDevs := 50
	// BENCH_COAP_SCALE multiplies the requests (longer runs: finer CPU
	// figures, /proc counts 10 ms ticks).
	if f, err := strconv.ParseFloat(os.Getenv("BENCH_COAP_SCALE"), 64); err == nil && f > 0 {
		for i := range scenarios {
			scenarios[i].total = max(scenarios[i].devs, int(float64(scenarios[i].total)*f))
		}
	}
	gws := []*coapGateway{newCoAPGateway(b, "Bastion", "", "cloud", maxDevs)}
	if base := os.Getenv("BENCH_BASTIOND_BASELINE"); base != "" {
		gws = append(gws, newCoAPGateway(b, "baseline", base, "cloud2", maxDevs))
	}
	var lines []string
	for i, sc := range scenarios {
		name := fmt.Sprintf("%ddev", sc.devs)
		if sc.inflight > 1 {
			name += fmt.Sprintf("x%d", sc.inflight)
		}
		order := slices.Clone(gws)
		if (coapBenchRound+i)%2 == 1 {
			slices.Reverse(order)
		}
		res := map[string]coapResult{}
		for _, g := range order {
			res[g.name] = g.run(b, sc.devs, sc.inflight, sc.total)
		}
		for _, g := range gws {
			r := res[g.name]
			line := fmt.Sprintf("%2d devices × %2d in flight, %5d requests | %-8s CPU %6.1f µs/request (%.2f cores), %6.0f requests/s, %.1f requests/fsync",
				sc.devs, sc.inflight, sc.total, g.name, r.cpuPerReq(), r.cpu.Seconds()/r.elapsed.Seconds(), r.rate(), r.perFsync())
			if len(gws) > 1 && g == gws[0] {
				line += fmt.Sprintf(" | CPU ratio to baseline %.2fx", r.cpuPerReq()/res[gws[1].name].cpuPerReq())
			}
			lines = append(lines, line)
			prefix := "bastion"
			if g != gws[0] {
				prefix = g.name
			}
			b.ReportMetric(r.cpuPerReq(), prefix+"-cpu-µs/req-"+name)
			b.ReportMetric(r.rate(), prefix+"-req/s-"+name)
		}
	}
	coapBenchRound++
	for _, l := range lines {
		b.Log(l)
	}
}

// coapBenchRound alternates which gateway goes first between -count rounds.
var coapBenchRound int

// coapGateway is one bastiond process, upstream to its own Mosquitto,
// with PSK devices.
type coapGateway struct {
	name, state string
	addr        string // the PSK CoAP listener
	pid         int
	devs        []*devicesim.Device
}

func newCoAPGateway(b *testing.B, name, bin, broker string, devs int) *coapGateway {
	cloud := mosquitto.Start(b, mosquitto.Options{Name: broker})
	state := filepath.Join(b.TempDir(), "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		b.Fatal(err)
	}
	cfg := gwConfig(b, state, cloud, cloud.CA.CertFile, mosquitto.ServerName, cloud.CA.Client(b, "gw1"), "gw1")
	cfg.Log.Level = "warn"
	if bin == "" {
		bin, _ = binaries(b)
	}
	p := startGatewayBin(b, bin, cfg, true)
	g := &coapGateway{name: name, state: state, addr: cfg.CoAP.PSKListen, pid: p.cmd.Process.Pid}
	for i := range devs {
		g.devs = append(g.devs, addDevice(b, state, fmt.Sprintf("c%d", i), "psk"))
	}
	// The upstream link is up before anything is timed.
	for deadline := time.Now().Add(30 * time.Second); metric(b, state, "bastion_upstream_connected") != 1; {
		if time.Now().After(deadline) {
			b.Fatalf("%s: upstream link not connected within 30 s", name)
		}
		time.Sleep(50 * time.Millisecond) // another process's state: nothing to wait on
	}
	return g
}

type coapResult struct {
	reqs    int
	elapsed time.Duration
	cpu     time.Duration
	fsyncs  float64
}

func (r coapResult) cpuPerReq() float64 { return float64(r.cpu.Microseconds()) / float64(r.reqs) }
func (r coapResult) rate() float64      { return float64(r.reqs) / r.elapsed.Seconds() }
func (r coapResult) perFsync() float64  { return float64(r.reqs) / r.fsyncs }

// run opens one session per device, then sends total requests in all,
// inflight at a time per session, every one answered 2.04, and waits
// until the queue has handed them all upstream.
func (g *coapGateway) run(b *testing.B, devs, inflight, total int) coapResult {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	per := total / devs
	var send []func() error
	for i := range devs {
		if inflight == 1 {
			c, err := g.devs[i].DialCoAP(ctx, g.addr)
			if err != nil {
				b.Fatalf("%s: dial: %v", g.name, err)
			}
			defer c.Close()
			send = append(send, func() error {
				for k := range per {
					r, err := c.Publish(ctx, "w", []byte(fmt.Sprintf("reading %d", k)))
					if err == nil && r.Code != codes.Changed {
						err = fmt.Errorf("answer %v %q", r.Code, r.Payload)
					}
					if err != nil {
						return err
					}
				}
				return nil
			})
			continue
		}
		c := dialPipelined(b, g.devs[i], g.addr)
		defer c.dc.Close()
		send = append(send, func() error { return c.publish(inflight, per) })
	}
	acked0 := metric(b, g.state, "bastion_queue_acked_total")
	fs0 := metric(b, g.state, "bastion_queue_fsyncs_total")
	cpu0 := cpuTime(b, g.pid)
	start := time.Now()
	errs := make(chan error, len(send))
	var wg sync.WaitGroup
	for _, f := range send {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatalf("%s: %v", g.name, err)
	}
	reqs := per * devs
	elapsed := time.Since(start)
	// Forwarded too: the queue has every message acknowledged upstream.
	for deadline := time.Now().Add(time.Minute); metric(b, g.state, "bastion_queue_acked_total")-acked0 < float64(reqs); {
		if time.Now().After(deadline) {
			b.Fatalf("%s: messages not forwarded upstream within 1 min", g.name)
		}
		time.Sleep(20 * time.Millisecond) // another process's state: nothing to wait on
	}
	return coapResult{reqs: reqs, elapsed: elapsed, cpu: cpuTime(b, g.pid) - cpu0,
		fsyncs: metric(b, g.state, "bastion_queue_fsyncs_total") - fs0}
}

// pipelinedDevice is a device session that keeps several confirmable
// requests outstanding (go-coap's client sends one at a time), datagram by
// datagram over pion/dtls with go-coap's codec.
type pipelinedDevice struct{ dc *piondtls.Conn }

func dialPipelined(b *testing.B, d *devicesim.Device, addr string) *pipelinedDevice {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dc, err := d.DialDTLS(ctx, addr)
	if err != nil {
		b.Fatal(err)
	}
	return &pipelinedDevice{dc: dc}
}

// publish sends n CON POSTs to /t/p with window outstanding at a time
// and checks that each is answered 2.04 (no retransmission: loopback
// loses nothing, and a lost datagram fails the run after 10 s).
func (p *pipelinedDevice) publish(window, n int) error {
	var sent, answered int
	buf := make([]byte, 2048)
	req := pool.NewMessage(context.Background())
	resp := pool.NewMessage(context.Background())
	for answered < n {
		for sent < n && sent-answered < window {
			mid := uint16(sent)
			req.Reset()
			req.SetCode(codes.POST)
			req.SetType(message.Confirmable)
			req.SetMessageID(int32(mid))
			req.SetToken(message.Token{byte(mid >> 8), byte(mid)})
			if err := req.SetPath("/t/p"); err != nil {
				return err
			}
			req.SetContentFormat(message.AppOctets)
			req.SetBody(bytes.NewReader([]byte("reading")))
			raw, err := req.MarshalWithEncoder(coder.DefaultCoder)
			if err != nil {
				return err
			}
			if _, err := p.dc.Write(raw); err != nil {
				return fmt.Errorf("send request %d: %w", sent, err)
			}
			sent++
		}
		_ = p.dc.SetReadDeadline(time.Now().Add(10 * time.Second))
		nr, err := p.dc.Read(buf)
		if err != nil {
			return fmt.Errorf("%d of %d requests answered: %w", answered, n, err)
		}
		if _, err := resp.UnmarshalWithDecoder(coder.DefaultCoder, buf[:nr]); err != nil {
			return fmt.Errorf("answer does not decode: %w", err)
		}
		if resp.Code() != codes.Changed {
			return fmt.Errorf("answer to message %d: %v", resp.MessageID(), resp.Code())
		}
		answered++
	}
	return nil
}

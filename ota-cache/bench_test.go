package otacache

// Serving benchmark, side by side with libcoap (documented in README.md):
//
//	go test -run '^$' -bench BenchmarkCoAPSServe -benchtime 1x -timeout 30m ./ota-cache/
//
// One run: a 16 MiB image fetched block-wise (1024-byte Block2, DTLS PSK,
// AES-128-CCM-8) by 100 concurrent devices, first from the gateway (a
// separate process: this test binary re-executed, holding a Cache and a
// go-coap DTLS server), then from libcoap's coap-server-openssl holding
// the same file. The devices are the same Go client (FetchCoAP) for both.
// Printed: aggregate throughput of each, the ratio, and the RSS growth of
// each server process during the run. Every device checks the sha256.
// OTACACHE_BENCH_DEVICES, OTACACHE_BENCH_MIB and OTACACHE_BENCH_LIMIT
// (a Go duration per server, default 8m) change the load and the bound.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"

	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

const benchPSK = "bench-psk-0123456789"

// benchSuite is the DTLS suite the devices offer: OTACACHE_BENCH_SUITE=gcm
// (TLS_PSK_WITH_AES_128_GCM_SHA256) or ccm8 (default,
// TLS_PSK_WITH_AES_128_CCM_8, what constrained devices use).
func benchSuite() piondtls.CipherSuiteID {
	if os.Getenv("OTACACHE_BENCH_SUITE") == "gcm" {
		return piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256
	}
	return piondtls.TLS_PSK_WITH_AES_128_CCM_8
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestHelperGatewayProcess is the gateway side of the benchmark, run in
// its own process by BenchmarkCoAPSServe; on its own it skips.
func TestHelperGatewayProcess(t *testing.T) {
	imgPath := os.Getenv("OTACACHE_HELPER_GATEWAY_IMAGE")
	if imgPath == "" {
		t.Skip("helper process for BenchmarkCoAPSServe")
	}
	data, err := os.ReadFile(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t)
	f.devices = newFakeDevices(map[string]DeviceInfo{})
	for i := range envInt("OTACACHE_BENCH_DEVICES", 100) {
		f.devices.set(fmt.Sprintf("bench-%d", i), DeviceInfo{Class: classA, Version: "1.0"})
	}
	_, sha := f.repo.addImage(classA, "1.1.0", 1, data)
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The vendor repository lives in this process only for the test; drop
	// its copy of the image so the baseline is the gateway's own.

	f.repo.Clear()

	data = nil
	runtime.GC()
	debug.FreeOSMemory()
	addr := startCoAPSWith(t, c, "127.0.0.1:0", func(id string) ([]byte, bool) {
		return []byte(benchPSK), strings.HasPrefix(id, "bench-")
	})
	if p := os.Getenv("OTACACHE_BENCH_CPUPROFILE"); p != "" {
		pf, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			t.Fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	fmt.Printf("READY %s /fw/sha256/%s\n", addr, sha)
	// Serve until the benchmark closes stdin.
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
}

func rssKiB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			n, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return n
		}
	}
	return -1
}

type loadResult struct {
	bytes      int64
	elapsed    time.Duration
	cpu        time.Duration // the server's CPU time during the load
	baseRSS    int64         // KiB
	peakRSS    int64         // KiB
	failures   int
	firstError string
}

func (r loadResult) mibps() float64 { return float64(r.bytes) / (1 << 20) / r.elapsed.Seconds() }

// cpuPerMiB is the server's CPU milliseconds per MiB served: unlike the
// rate, it hardly depends on what else the machine is doing.
func (r loadResult) cpuPerMiB() float64 {
	return float64(r.cpu.Microseconds()) / 1e3 / (float64(r.bytes) / (1 << 20))
}

// seqHash hashes writes in arrival order (FetchCoAP writes in order).
type seqHash struct {
	h hash.Hash
	n *atomic.Int64
}

func (s seqHash) WriteAt(p []byte, _ int64) (int, error) {
	s.n.Add(int64(len(p)))
	return s.h.Write(p)
}

// runLoad has n devices fetch path from addr concurrently and samples the
// server's RSS.
func runLoad(b *testing.B, addr, path string, n int, want [32]byte, size int64, serverPID int, limit time.Duration) loadResult {
	conns := make([]CoAPGetter, n)
	for i := range n {
		conns[i] = dialDeviceKey(b, addr, fmt.Sprintf("bench-%d", i), []byte(benchPSK), benchSuite())
	}
	res := loadResult{baseRSS: rssKiB(serverPID)}
	res.peakRSS = res.baseRSS
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var total atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-tk.C:
				if r := rssKiB(serverPID); r > res.peakRSS {
					res.peakRSS = r
				}
			}
		}
	}()
	var wg sync.WaitGroup
	var mu sync.Mutex
	cpu0 := testenv.ProcCPU(serverPID)
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := sha256.New()
			got, err := FetchCoAP(ctx, conns[i], path, seqHash{h, &total}, 0, blockwise.SZX1024, size)
			if err == nil && (got.Size != size || !bytes.Equal(h.Sum(nil), want[:])) {
				err = fmt.Errorf("device %d: %d bytes with the wrong sha256", i, got.Size)
			}
			if err != nil {
				mu.Lock()
				res.failures++
				if res.firstError == "" {
					res.firstError = err.Error()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.cpu = testenv.ProcCPU(serverPID) - cpu0
	close(stopSampling)
	<-sampled
	res.bytes = total.Load()
	return res
}

// udpListening reports whether something listens on 127.0.0.1:port/udp.
func udpListening(port int) bool {
	b, err := os.ReadFile("/proc/net/udp")
	if err != nil {
		return false
	}
	return bytes.Contains(b, []byte(fmt.Sprintf("0100007F:%04X", port)))
}

func freeUDPPortPair(b *testing.B) int {
	for range 50 {
		l, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		p := l.LocalAddr().(*net.UDPAddr).Port
		l.Close()
		ok := true
		for _, addr := range []string{"udp:" + strconv.Itoa(p), "udp:" + strconv.Itoa(p+1), "tcp:" + strconv.Itoa(p), "tcp:" + strconv.Itoa(p+1)} {
			netw, port, _ := strings.Cut(addr, ":")
			var c interface{ Close() error }
			if netw == "udp" {
				c, err = net.ListenPacket("udp", "127.0.0.1:"+port)
			} else {
				c, err = net.Listen("tcp", "127.0.0.1:"+port)
			}
			if err != nil {
				ok = false
				break
			}
			c.Close()
		}
		if ok && p+1 < 65536 {
			return p
		}
	}
	b.Fatal("no free port pair for coap-server-openssl")
	return 0
}

func BenchmarkCoAPSServe(b *testing.B) {
	server := testenv.RequireCommand(b, "coap-server-openssl")
	client := testenv.RequireCommand(b, "coap-client-openssl")
	n := envInt("OTACACHE_BENCH_DEVICES", 100)
	size := int64(envInt("OTACACHE_BENCH_MIB", 16)) << 20
	limit := 8 * time.Minute
	if d, err := time.ParseDuration(os.Getenv("OTACACHE_BENCH_LIMIT")); err == nil {
		limit = d
	}
	img := testImage(int(size), 99)
	want := sha256.Sum256(img)
	imgPath := filepath.Join(b.TempDir(), "image.bin")
	if err := os.WriteFile(imgPath, img, 0o600); err != nil {
		b.Fatal(err)
	}
	img = nil
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}

	for range b.N {
		// --- the gateway (ota-cache + go-coap DTLS), its own process ---
		gw := child.DieWithTest(exec.Command(exe, "-test.run=^TestHelperGatewayProcess$", "-test.count=1"))
		gw.Env = append(os.Environ(), "OTACACHE_HELPER_GATEWAY_IMAGE="+imgPath, "OTACACHE_BENCH_DEVICES="+strconv.Itoa(n))
		if p := os.Getenv("OTACACHE_BENCH_GATEWAY_GOMAXPROCS"); p != "" {
			gw.Env = append(gw.Env, "GOMAXPROCS="+p)
		}
		stdin, _ := gw.StdinPipe()
		stdout, _ := gw.StdoutPipe()
		gw.Stderr = os.Stderr
		if err := gw.Start(); err != nil {
			b.Fatal(err)
		}
		line, err := bufio.NewReader(stdout).ReadString('\n')
		fields := strings.Fields(line)
		if err != nil || len(fields) != 3 || fields[0] != "READY" {
			stdin.Close()
			_ = gw.Wait()
			b.Fatalf("gateway helper did not start: %q %v", line, err)
		}
		gwRes := runLoad(b, fields[1], fields[2], n, want, size, gw.Process.Pid, limit)
		stdin.Close()
		if err := gw.Wait(); err != nil {
			b.Errorf("gateway helper: %v", err)
		}

		// --- libcoap coap-server-openssl with the same file ---
		port := freeUDPPortPair(b)
		srv := child.DieWithTest(exec.Command(server, "-A", "127.0.0.1", "-p", strconv.Itoa(port), "-k", benchPSK, "-d", "4", "-v", "0"))
		if err := srv.Start(); err != nil {
			b.Fatal(err)
		}
		dtlsURL := "coaps://127.0.0.1:" + strconv.Itoa(port+1) + "/fw/image"
		// Wait until it has bound its DTLS port (bounded), then upload the
		// image with a block-wise PUT (a dynamic resource).
		for try := 0; !udpListening(port + 1); try++ {
			if try > 1000 {
				b.Fatal("coap-server-openssl did not bind its DTLS port")
			}
			runtime.Gosched()
			time.Sleep(5 * time.Millisecond) // polling an external process's socket table
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		up, err := exec.CommandContext(ctx, client, "-B", "240", "-m", "put", "-b", "1024", "-f", imgPath, "-k", benchPSK, "-u", "bench-upload", dtlsURL).CombinedOutput()
		cancel()
		if err != nil || len(bytes.TrimSpace(up)) > 0 {
			b.Fatalf("upload to coap-server-openssl: %v %s", err, up)
		}
		lcRes := runLoad(b, "127.0.0.1:"+strconv.Itoa(port+1), "/fw/image", n, want, size, srv.Process.Pid, limit)
		_ = srv.Process.Kill()
		_ = srv.Wait()

		for name, r := range map[string]loadResult{"bastion": gwRes, "libcoap": lcRes} {
			b.Logf("%-8s %s, %d devices x %d MiB: %d bytes in %v = %.2f MiB/s; server CPU %.1f ms/MiB; RSS %d -> %d KiB (growth %.1f MiB); failures %d %s",
				name, benchSuite(), n, size>>20, r.bytes, r.elapsed.Round(time.Millisecond), r.mibps(), r.cpuPerMiB(), r.baseRSS, r.peakRSS,
				float64(r.peakRSS-r.baseRSS)/1024, r.failures, r.firstError)
		}
		ratio := gwRes.mibps() / lcRes.mibps()
		growth := float64(gwRes.peakRSS-gwRes.baseRSS) / 1024
		b.Logf("throughput ratio bastion/libcoap = %.2fx (goal >= 1.0); bastion RSS growth %.1f MiB (goal <= 64)", ratio, growth)
		b.ReportMetric(gwRes.mibps(), "bastion-MiB/s")
		b.ReportMetric(lcRes.mibps(), "libcoap-MiB/s")
		b.ReportMetric(ratio, "ratio")
		b.ReportMetric(growth, "bastion-RSS-growth-MiB")
		b.ReportMetric(gwRes.cpuPerMiB(), "bastion-cpu-ms/MiB")
		b.ReportMetric(lcRes.cpuPerMiB(), "libcoap-cpu-ms/MiB")
		if gwRes.failures > 0 {
			b.Errorf("bastion: %d of %d devices failed: %s", gwRes.failures, n, gwRes.firstError)
		}
		if lcRes.failures > 0 {
			// Seen on a loaded machine: about 93 s (CoAP's MAX_TRANSMIT_WAIT)
			// into its run, coap-server-openssl answers without the ETag and
			// every device stops. Its rate then covers only part of the image.
			b.Logf("libcoap run incomplete (%d devices failed): its rate and the ratio cover only the bytes served before the failure; use fewer devices or OTACACHE_BENCH_MIB so it ends sooner", lcRes.failures)
		}
	}
}

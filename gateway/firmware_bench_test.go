package gateway

// BenchmarkGatewayFirmwareMemory shows that the memory bound is real in
// the running gateway: N CoAPS devices fetch an M MiB image block by block
// through bridges/coap (otacache.ServeDTLS, bounded response cache), and
// then the same load goes to a stock go-coap dtls.Server serving the same
// cache in the same process, as bridges/coap did before. Heap in use is
// read after a GC while the sessions are still open (go-coap's default
// cache keeps each response for 247 s, so it would still hold them).
//
//	go test -run '^$' -bench BenchmarkGatewayFirmwareMemory -benchtime 1x ./gateway/
//	BASTION_FW_BENCH_DEVICES=20 BASTION_FW_BENCH_MIB=4 (defaults)

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"

	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

type hashWriterAt struct{ h hash.Hash }

func (w hashWriterAt) WriteAt(p []byte, _ int64) (int, error) { return w.h.Write(p) }

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func heapInuse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

func BenchmarkGatewayFirmwareMemory(b *testing.B) {
	n := envInt("BASTION_FW_BENCH_DEVICES", 20)
	mib := envInt("BASTION_FW_BENCH_MIB", 4)
	img := tufrepo.Image(mib<<20, 7)
	v := newFWVendor(b)
	sha := v.publish(b, fwClassA, "1.0.0", 1, img)
	g := startFirmwareGateway(b, v)
	var devs []*devicesim.Device
	for i := range n {
		d, _ := g.addFWDevice(b, fmt.Sprintf("bench-%d", i), "psk", fwClassA)
		devs = append(devs, d)
	}
	if err := g.g.Firmware().Check(context.Background()); err != nil {
		b.Fatal(err)
	}
	path := "/fw/sha256/" + sha

	// run fetches with every device at once against addr and returns the
	// heap growth with the sessions still open, and the throughput.
	run := func(name, addr string) (growthMiB, mibps float64) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		base := heapInuse()
		var wg sync.WaitGroup
		conns := make([]*devicesim.FirmwareCoAP, n)
		errs := make([]error, n)
		start := time.Now()
		for i, d := range devs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := d.DialFirmwareCoAP(ctx, addr)
				if err != nil {
					errs[i] = err
					return
				}
				conns[i] = c
				h := sha256.New()
				if _, err := otacache.FetchCoAP(ctx, c.Conn(), path, hashWriterAt{h}, 0, blockwise.SZX1024, int64(len(img))); err != nil {
					errs[i] = err
					return
				}
				if hex.EncodeToString(h.Sum(nil)) != sha {
					errs[i] = fmt.Errorf("device %d: wrong sha256", i)
				}
			}()
		}
		wg.Wait()
		el := time.Since(start)
		after := heapInuse()
		growth := after - min(base, after)
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		for _, err := range errs {
			if err != nil {
				b.Fatalf("%s: %v", name, err)
			}
		}
		mibps = float64(n*mib) / el.Seconds()
		b.Logf("%-22s %d devices x %d MiB in %v = %.2f MiB/s; heap in use with sessions open +%.1f MiB",
			name, n, mib, el.Round(time.Millisecond), mibps, float64(growth)/(1<<20))
		return float64(growth) / (1 << 20), mibps
	}
	b.ResetTimer()
	gwGrowth, gwRate := run("gateway (bridges/coap)", g.g.Addrs()["coaps_psk"])

	// The same cache behind go-coap's stock dtls.Server.
	id := g.g.identity()
	l, err := coapnet.NewDTLSListener("udp", "127.0.0.1:0", coapnet.NewDTLSServerOptions(pki.DTLSPSKServer(func(hint []byte) ([]byte, error) {
		_, k, err := id.PSK(hint)
		return k, err
	})...))
	if err != nil {
		b.Fatal(err)
	}
	r := mux.NewRouter()
	r.DefaultHandle(mux.HandlerFunc(func(w mux.ResponseWriter, m *mux.Message) {
		dc, _ := w.Conn().NetConn().(*piondtls.Conn)
		st, ok := dc.ConnectionState()
		dev, _, err := id.PSK(st.IdentityHint)
		if !ok || err != nil {
			_ = w.SetResponse(codes.Unauthorized, message.TextPlain, nil)
			return
		}
		g.g.Firmware().ServeCoAP(w, m, dev)
	}))
	sctx, scancel := context.WithCancel(context.Background())
	srv := dtls.NewServer(options.WithMux(r), options.WithContext(sctx), options.WithErrors(func(error) {}),
		options.WithPeriodicRunner(periodic.New(sctx.Done(), time.Second)))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	stockGrowth, stockRate := run("stock go-coap server", l.Addr().String())
	b.StopTimer()
	scancel()
	srv.Stop()
	<-done
	b.Logf("heap growth gateway/stock = %.1f/%.1f MiB (%.2fx); throughput ratio gateway/stock = %.2fx",
		gwGrowth, stockGrowth, gwGrowth/max(stockGrowth, 0.01), gwRate/stockRate)
	b.ReportMetric(gwGrowth, "gateway-heap-MiB")
	b.ReportMetric(stockGrowth, "stock-heap-MiB")
	b.ReportMetric(gwRate, "gateway-MiB/s")
	b.ReportMetric(stockRate, "stock-MiB/s")
}

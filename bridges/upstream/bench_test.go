package upstream

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// BenchmarkBridge compares, in one run on loopback, Bastion's durable path
//
//	publisher -> Accept (fsync, group commit) -> queue -> upstream link (MQTT v5, TLS 1.3, client cert) -> Mosquitto -> subscriber
//
// with the peers' own way of doing this: Mosquitto configured as a bridge
// (MQTT v5, TLS 1.3, client cert) to a second Mosquitto,
//
//	publisher (MQTT v5 over TLS 1.3, QoS 1) -> Mosquitto (bridge) -> Mosquitto -> subscriber
//
// Each publisher waits for its acknowledgement (Accept returning; PUBACK)
// before sending its next message. 100-byte payloads, QoS 1 throughout.
// Run it with:
//
//	go test -run '^$' -bench BenchmarkBridge -benchtime 1x ./bridges/upstream/
//
// The device leg into Bastion (MQTT/CoAP transports) does not exist yet, so
// Bastion's publishers call Accept in-process while Mosquitto's publishers
// pay a TLS MQTT hop: docs/performance.md says so next to the numbers.
func BenchmarkBridge(b *testing.B) {
	scenarios := []struct {
		pubs, each int
	}{{1, 3000}, {50, 300}}
	var lines []string
	for _, sc := range scenarios {
		total := sc.pubs * sc.each
		cloud := mosquitto.Start(b, mosquitto.Options{Name: fmt.Sprintf("cloud%d", sc.pubs)})
		sub := mosquitto.Subscribe(b, cloud, fmt.Sprintf("sub%d", sc.pubs), "bastion/#", false)

		// Bastion.
		l := startLink(b, linkConfig(b, cloud, "gw1"), b.TempDir())
		waitFor(b, "bastion link up", 10*time.Second, func() bool { return l.up.Status().Connected })
		bastion := run(b, sub, total, sc.pubs, func(p int) (func([]byte) error, func()) {
			dev := fmt.Sprintf("dev%d", p)
			return func(payload []byte) error {
				return l.up.Accept(context.Background(), bridges.Message{Device: dev, Topic: "devices/" + dev + "/t/n", QoS: 1, Payload: payload})
			}, func() {}
		})
		l.stop()

		// Mosquitto bridge to the same cloud broker.
		bridgeLeaf := cloud.CA.Client(b, "gw-mosq")
		edge := mosquitto.Start(b, mosquitto.Options{Name: fmt.Sprintf("edge%d", sc.pubs), CA: cloud.CA, Config: fmt.Sprintf(`
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
topic # out 1 devices/ bastion/gw1/
`, cloud.Addr, cloud.CA.CertFile, bridgeLeaf.CertFile, bridgeLeaf.KeyFile)})
		waitFor(b, "mosquitto bridge connected", 15*time.Second, func() bool { return strings.Contains(cloud.Log(), "u'gw-mosq'") })
		mosq := run(b, sub, total, sc.pubs, func(p int) (func([]byte) error, func()) {
			dev := fmt.Sprintf("dev%d", p)
			c := mqttClient(b, edge, fmt.Sprintf("pub%d", p))
			return func(payload []byte) error {
					_, err := c.Publish(context.Background(), &paho.Publish{Topic: "devices/" + dev + "/t/n", QoS: 1, Payload: payload})
					return err
				}, func() {
					c.Disconnect(&paho.Disconnect{})
				}
		})
		edge.Stop(b)

		tput := func(r benchResult) float64 { return float64(r.msgs) / r.el.Seconds() }
		ratio := tput(bastion) / tput(mosq)
		lines = append(lines,
			fmt.Sprintf("%3d publishers, %6d msgs | bastion %8.0f msg/s p50 %7v p99 %7v | mosquitto bridge %8.0f msg/s p50 %7v p99 %7v | throughput ratio %.2fx, p99 ratio %.2fx",
				sc.pubs, total, tput(bastion), bastion.p50.Round(time.Microsecond), bastion.p99.Round(time.Microsecond),
				tput(mosq), mosq.p50.Round(time.Microsecond), mosq.p99.Round(time.Microsecond), ratio, float64(bastion.p99)/float64(mosq.p99)))
		b.ReportMetric(ratio, fmt.Sprintf("tput-ratio-%dpub", sc.pubs))
		b.ReportMetric(float64(bastion.p99.Microseconds()), fmt.Sprintf("bastion-p99-us-%dpub", sc.pubs))
		b.ReportMetric(float64(mosq.p99.Microseconds()), fmt.Sprintf("mosquitto-p99-us-%dpub", sc.pubs))
	}
	for _, l := range lines {
		b.Log(l)
	}
}

type benchResult = struct {
	msgs          int
	el            time.Duration
	p50, p99, max time.Duration
}

// run drives total messages from pubs publishers (each waiting for its
// acknowledgement) and measures end-to-end latency at the subscriber.
func run(b *testing.B, sub *mosquitto.Subscriber, total, pubs int, mk func(p int) (send func([]byte) error, done func())) benchResult {
	b.Helper()
	// Drain anything left over from an earlier run.
	for len(sub.Got) > 0 {
		<-sub.Got
	}
	lat := make([]time.Duration, 0, total)
	recvDone := make(chan struct{})
	var last time.Time
	go func() {
		defer close(recvDone)
		seen := make(map[uint64]bool, total)
		timeout := time.After(120 * time.Second)
		for len(seen) < total {
			select {
			case p := <-sub.Got:
				if len(p.Payload) < 16 {
					continue
				}
				id := binary.BigEndian.Uint64(p.Payload[8:])
				if seen[id] {
					continue
				}
				seen[id] = true
				now := time.Now()
				lat = append(lat, now.Sub(time.Unix(0, int64(binary.BigEndian.Uint64(p.Payload)))))
				last = now
			case <-timeout:
				return
			}
		}
	}()
	each := total / pubs
	var wg sync.WaitGroup
	start := time.Now()
	errs := make(chan error, pubs)
	for p := range pubs {
		send, done := mk(p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer done()
			payload := make([]byte, 100)
			for i := range each {
				binary.BigEndian.PutUint64(payload[8:], uint64(p*each+i))
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				if err := send(payload); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	<-recvDone
	close(errs)
	for err := range errs {
		b.Fatalf("publish: %v", err)
	}
	if len(lat) < total {
		b.Fatalf("received %d of %d", len(lat), total)
	}
	slices.Sort(lat)
	return benchResult{msgs: total, el: last.Sub(start), p50: lat[len(lat)/2], p99: lat[len(lat)*99/100], max: lat[len(lat)-1]}
}

// mqttClient is a plain paho MQTT v5 client over TLS 1.3 with a client
// certificate (a device, for the Mosquitto side of the benchmark).
func mqttClient(tb testing.TB, br *mosquitto.Broker, cn string) *paho.Client {
	tb.Helper()
	conn, err := tls.Dial("tcp", br.Addr, br.ClientTLS(br.CA.Client(tb, cn)))
	if err != nil {
		tb.Fatalf("dial %s: %v", br.Addr, err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: packets.NewThreadSafeConn(conn), ClientID: cn})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: cn, CleanStart: true, KeepAlive: 30}); err != nil {
		tb.Fatalf("connect %s: %v", cn, err)
	}
	return c
}

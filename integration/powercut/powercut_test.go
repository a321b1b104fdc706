package powercut

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// generations tells the simulated devices which bastiond is current: after
// the SIGKILL they wait for the restarted one instead of retrying blindly.
type generations struct {
	mu     sync.Mutex
	gen    int  // current process generation, 1-based
	dead   bool // the current generation was killed
	change chan struct{}
}

func (g *generations) current() (gen int, dead bool, change <-chan struct{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.gen, g.dead, g.change
}

func (g *generations) set(gen int, dead bool) {
	g.mu.Lock()
	g.gen, g.dead = gen, dead
	close(g.change)
	g.change = make(chan struct{})
	g.mu.Unlock()
}

// waitAlive blocks until a live generation newer than after (or the current
// one if it is alive and after is 0) is up.
func (g *generations) waitAlive(ctx context.Context, after int) (int, error) {
	for {
		gen, dead, ch := g.current()
		if gen > after && !dead {
			return gen, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, fmt.Errorf("no live bastiond after generation %d: %w", after, ctx.Err())
		}
	}
}

// acks records what the devices saw acknowledged.
type acks struct {
	mu      sync.Mutex
	acked   map[int]bool
	reached chan struct{} // closed when len(acked) reaches at
	at      int
}

func (a *acks) add(i int) {
	a.mu.Lock()
	a.acked[i] = true
	if len(a.acked) == a.at {
		close(a.reached)
	}
	a.mu.Unlock()
}

func (a *acks) n() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.acked)
}

type seqPayload struct {
	D string `json:"d"` // device name
	I int    `json:"i"` // unique sequence number over the whole run
}

// TestPowerCut is the full-stack proof that Bastion loses nothing: the
// cloud Mosquitto is down; MQTT and CoAP devices publish 10,000 QoS 1 /
// confirmable messages with unique sequence numbers through a real
// bastiond process; after 5,000 acknowledgements bastiond is SIGKILLed and
// restarted on the same state directory and the devices carry on (a
// message whose acknowledgement they did not see is sent again); the
// cloud comes back. Every message a device saw acknowledged must arrive at
// the cloud subscriber at least once, first arrivals in order per device;
// duplicates are counted and reported.
func TestPowerCut(t *testing.T) {
	testenv.RequireCommand(t, "mosquitto")
	const (
		mqttDevices, coapDevices = 8, 2
		perDevice                = 1000
		total                    = (mqttDevices + coapDevices) * perDevice
		killAt                   = total / 2
		gatewayID                = "gw-pc"
	)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	start := time.Now()

	cloudCA := testpki.New(t, t.TempDir(), "cloud")
	cloud := mosquitto.Start(t, mosquitto.Options{CA: cloudCA, Persistent: true})
	// The subscriber's session survives the broker restart: it gets
	// everything published while it was away, as a cloud consumer would.
	sub := mosquitto.Subscribe(t, cloud, "cloud-sub", "bastion/"+gatewayID+"/#", true)
	cloud.Stop(t)

	state := filepath.Join(t.TempDir(), "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := gwConfig(t, state, cloud, cloudCA.CertFile, mosquitto.ServerName, cloudCA.Client(t, gatewayID), gatewayID)
	var (
		pmu sync.Mutex
		p   = startGateway(t, cfg, true)
	)
	gens := &generations{gen: 1, change: make(chan struct{})}

	type dev struct {
		*devicesim.Device
		coap bool
		base int // first sequence number
	}
	var devs []dev
	for i := range mqttDevices {
		devs = append(devs, dev{Device: addDevice(t, state, fmt.Sprintf("meter-%d", i), "cert"), base: len(devs) * perDevice})
	}
	for i := range coapDevices {
		devs = append(devs, dev{Device: addDevice(t, state, fmt.Sprintf("lamp-%d", i), "psk"), coap: true, base: len(devs) * perDevice})
	}
	a := &acks{acked: map[int]bool{}, reached: make(chan struct{}), at: killAt}

	// The power cut, once half of the messages are acknowledged.
	var restartErr error
	restarted := make(chan struct{})
	go func() {
		defer close(restarted)
		select {
		case <-a.reached:
		case <-ctx.Done():
			restartErr = fmt.Errorf("only %d acknowledgements before the time limit", a.n())
			return
		}
		gens.set(1, true)
		pmu.Lock()
		p.kill()
		pmu.Unlock()
	}()

	errs := make(chan error, len(devs))
	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addr := cfg.MQTT.Listen
			if d.coap {
				addr = cfg.CoAP.PSKListen
			}
			errs <- runDevice(ctx, d.Device, d.coap, addr, d.base, perDevice, gens, a)
		}()
	}

	// Restart on the same state directory once the old process is gone.
	<-restarted
	if restartErr != nil {
		cancel()
		wg.Wait()
		t.Fatal(restartErr)
	}
	killedAfter := a.n()
	pmu.Lock()
	p = startGateway(t, cfg, false)
	pmu.Unlock()
	gens.set(2, false)
	t.Logf("SIGKILL after %d acknowledgements (%v in); restarted", killedAfter, time.Since(start).Round(time.Millisecond))

	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	acked := a.acked
	if len(acked) != total {
		t.Fatalf("devices saw %d of %d messages acknowledged", len(acked), total)
	}
	// Nothing has left yet (the cloud is down): the restarted queue holds
	// every acknowledged message, as the operator's tool reports it.
	st := bastionctlStatus(t, state)
	held := st.Components.Upstream.Queue.Depth
	if held < len(acked) {
		t.Fatalf("bastionctl status: queue depth %d after the restart, want >= %d acknowledged", held, len(acked))
	}
	if st.Components.Upstream.Link.Connected {
		t.Fatalf("bastionctl status: link connected while the cloud broker is stopped")
	}

	cloud.Start(t)
	got := map[int]int{}
	received, orderViolations := 0, 0
	lastPerDev := map[string]int{}
	take := func(m []byte) {
		var v seqPayload
		if err := json.Unmarshal(m, &v); err != nil {
			t.Fatalf("cloud got payload %q: %v", m, err)
		}
		received++
		got[v.I]++
		if got[v.I] == 1 {
			if last, ok := lastPerDev[v.D]; ok && v.I < last {
				orderViolations++
			}
			lastPerDev[v.D] = v.I
		}
	}
	for missing := len(acked); missing > 0; {
		select {
		case m := <-sub.Got:
			before := len(got)
			take(m.Payload)
			if len(got) > before {
				var v seqPayload
				json.Unmarshal(m.Payload, &v)
				if acked[v.I] {
					missing--
				}
			}
		case <-ctx.Done():
			t.Fatalf("%d of %d acknowledged messages never arrived upstream (received %d); bastionctl status %+v\nbroker log:\n%s",
				missing, len(acked), received, bastionctlStatus(t, state), cloud.Log())
		}
	}
	// The queue drains to zero once every PUBACK came back; whatever else
	// the subscriber gets until then is counted as a duplicate.
	drained := time.After(30 * time.Second)
	for {
		st = bastionctlStatus(t, state)
		if st.Components.Upstream.Queue.Depth == 0 {
			break
		}
		select {
		case m := <-sub.Got:
			take(m.Payload)
		case <-drained:
			t.Fatalf("queue depth %d, not drained 30s after every message arrived", st.Components.Upstream.Queue.Depth)
		case <-time.After(100 * time.Millisecond): // between status polls of the other process
		}
	}
	for len(sub.Got) > 0 {
		take((<-sub.Got).Payload)
	}
	pmu.Lock()
	p.stop()
	pmu.Unlock()
	dups := received - len(got)
	coapAcked := 0
	for i := range acked {
		if i >= mqttDevices*perDevice {
			coapAcked++
		}
	}
	if coapAcked != coapDevices*perDevice {
		t.Errorf("CoAP devices saw %d acknowledged, want %d", coapAcked, coapDevices*perDevice)
	}
	t.Logf("power cut summary: %d devices (%d MQTT, %d CoAP), %d acknowledged (%d of them over CoAP; %d before SIGKILL), queue held %d, cloud received %d (%d distinct, %d duplicates, %d delivered but never acknowledged to a device), lost 0, order violations %d, %v",
		len(devs), mqttDevices, coapDevices, len(acked), coapAcked, killedAfter, held, received, len(got), dups, len(got)-len(acked), orderViolations, time.Since(start).Round(time.Millisecond))
	if orderViolations > 0 {
		t.Errorf("%d messages arrived out of order for their device", orderViolations)
	}
}

// runDevice publishes n messages with sequence numbers base.. as one device
// (MQTT QoS 1 or CoAP confirmable), each waiting for its acknowledgement
// before the next. When the gateway dies it waits for the restarted one,
// reconnects and sends the unacknowledged message again.
func runDevice(ctx context.Context, d *devicesim.Device, coap bool, addr string, base, n int, gens *generations, a *acks) error {
	var (
		mc  *devicesim.MQTT
		cc  *devicesim.CoAP
		gen int
	)
	closeConn := func() {
		if mc != nil {
			mc.Close()
			mc = nil
		}
		if cc != nil {
			cc.Close()
			cc = nil
		}
	}
	defer closeConn()
	failures := 0
	for i := 0; i < n; {
		if ctx.Err() != nil {
			return fmt.Errorf("device %s: time limit at message %d of %d", d.Name, i, n)
		}
		if mc == nil && cc == nil {
			g, err := gens.waitAlive(ctx, 0)
			if err != nil {
				return fmt.Errorf("device %s: %w", d.Name, err)
			}
			gen = g
			if coap {
				cc, err = d.DialCoAP(ctx, addr)
			} else {
				mc, err = d.DialMQTT(ctx, addr, nil)
			}
			if err != nil {
				if err := retryOrWait(ctx, d, gens, gen, &failures, err); err != nil {
					return err
				}
				continue
			}
		}
		payload, _ := json.Marshal(seqPayload{D: d.Name, I: base + i})
		var ok bool
		var err error
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		if coap {
			var r devicesim.Response
			r, err = cc.Publish(pctx, "seq", payload)
			if err == nil && r.Code != codes.Changed {
				err = fmt.Errorf("coap answer %v %q", r.Code, r.Payload)
				pcancel()
				return fmt.Errorf("device %s message %d refused: %w", d.Name, base+i, err)
			}
			ok = err == nil
		} else {
			var rc byte
			rc, err = mc.Publish(pctx, "devices/"+d.ID+"/t/seq", 1, payload)
			if err == nil && rc != 0 {
				pcancel()
				return fmt.Errorf("device %s message %d refused with PUBACK reason 0x%02x", d.Name, base+i, rc)
			}
			ok = err == nil
		}
		pcancel()
		if ok {
			a.add(base + i)
			i++
			continue
		}
		closeConn()
		if err := retryOrWait(ctx, d, gens, gen, &failures, err); err != nil {
			return err
		}
	}
	return nil
}

// retryOrWait decides what a device does after a failed dial or publish:
// if its gateway was killed, wait for the restarted one; otherwise retry a
// bounded number of times (a slow fsync under load can time a request out).
func retryOrWait(ctx context.Context, d *devicesim.Device, gens *generations, gen int, failures *int, cause error) error {
	cur, dead, _ := gens.current()
	if cur == gen && dead {
		_, err := gens.waitAlive(ctx, gen)
		if err != nil {
			return fmt.Errorf("device %s: %w (after %v)", d.Name, err, cause)
		}
		return nil
	}
	if cur != gen {
		return nil // a newer gateway is already up
	}
	*failures++
	if *failures > 5 {
		return fmt.Errorf("device %s: %d failures with a live gateway, last: %w", d.Name, *failures, cause)
	}
	return nil
}

package gateway

// The console's privacy opt-outs change what the gateway keeps, not only
// what it shows: switched on through the console API, they erase what was
// kept and keep nothing new, and they hold after a restart.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

func (c *consoleAPI) optOut(t *testing.T, datum string, off bool) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"datum": datum, "opt_out": off})
	req, _ := http.NewRequest("PUT", c.base+"/api/v1/privacy/optout", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("opt out of %s: %d", datum, resp.StatusCode)
	}
}

func TestPrivacyOptOutsAreEnforced(t *testing.T) {
	v := newFWVendor(t)
	img := tufrepo.Image(3000, 1)
	sha := v.publish(t, fwClassA, "1.1.0", 1, img)
	dir := filepath.Join(t.TempDir(), "state")
	g := startFirmwareGatewayIn(t, v, dir)
	d, _ := g.addFWDevice(t, "thermo", "psk", fwClassA)
	g.check(t)
	ctx := ctxT(t, 60*time.Second)

	report := func(g *fwgw, state string) {
		t.Helper()
		fc, err := d.DialFirmwareCoAP(ctx, g.g.Addrs()["coaps_psk"])
		if err != nil {
			t.Fatal(err)
		}
		defer fc.Close()
		if err := otacache.ReportStatusCoAP(ctx, fc.Conn(), devicesim.StatusPath, otacache.DeviceStatus{State: state, Version: "1.1.0", SHA256: sha}); err != nil {
			t.Fatal(err)
		}
		if _, err := fc.Publish(ctx, "/t/temp", []byte("21")); err != nil {
			t.Fatal(err)
		}
	}
	report(g, otacache.StateDownloading)
	if _, err := g.g.Store().FirmwareStatus(d.ID); err != nil {
		t.Fatalf("before opting out the status is not stored: %v", err)
	}
	if tr, ok := g.g.Hub().Traffic(d.ID); !ok || tr.MessagesIn != 1 || tr.LastSeen.IsZero() {
		t.Fatalf("before opting out: traffic %+v %v", tr, ok)
	}

	api := newConsoleAPI(t, g.g)
	api.optOut(t, optOutFwStatus, true)
	api.optOut(t, optOutCounters, true)
	api.optOut(t, optOutLastSeen, true)
	if _, err := g.g.Store().FirmwareStatus(d.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("firmware.status opted out: stored report not erased (%v)", err)
	}
	if tr, ok := g.g.Hub().Traffic(d.ID); ok {
		t.Errorf("counters and last seen opted out: still kept %+v", tr)
	}
	report(g, otacache.StateFailed)
	if _, err := g.g.Store().FirmwareStatus(d.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("firmware.status opted out: a new report was stored (%v)", err)
	}
	if tr, ok := g.g.Hub().Traffic(d.ID); ok {
		t.Errorf("counters and last seen opted out: new traffic kept %+v", tr)
	}
	if st := g.statuses(t); len(st) != 0 {
		t.Errorf("firmware.status opted out: /v1/firmware shows %+v", st)
	}
	if rows := api.statusRows(t); len(rows) != 0 {
		t.Errorf("firmware.status opted out: console shows %+v", rows)
	}

	// After a restart the opt-outs hold from the first message.
	g.stop()
	g = startFirmwareGatewayIn(t, v, dir)
	report(g, otacache.StateFailed)
	if _, err := g.g.Store().FirmwareStatus(d.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("after restart: report stored despite the opt-out (%v)", err)
	}
	if tr, ok := g.g.Hub().Traffic(d.ID); ok {
		t.Errorf("after restart: traffic kept despite the opt-outs: %+v", tr)
	}

	// Opting back in keeps data again from the next change on.
	api = newConsoleAPI(t, g.g)
	api.optOut(t, optOutFwStatus, false)
	api.optOut(t, optOutCounters, false)
	report(g, otacache.StateInstalled)
	if _, err := g.g.Store().FirmwareStatus(d.ID); err != nil {
		t.Errorf("opted back in: report not stored (%v)", err)
	}
	if tr, ok := g.g.Hub().Traffic(d.ID); !ok || tr.MessagesIn != 1 || !tr.LastSeen.IsZero() {
		t.Errorf("counters back in, last seen still out: traffic %+v %v", tr, ok)
	}
}

// A firmware status report racing the firmware.status opt-out is not
// kept: the opt-out is read in the report's write transaction, so the
// report is either written before the opt-out (and erased with the
// others) or turned into a delete. Read before, in a transaction of its
// own, the report could be written after the opt-out erased the stored
// ones. Each round starts both at once; without the one transaction most
// rounds keep the report.
func TestFirmwareStatusRacingTheOptOutIsNotKept(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	g := &Gateway{store: st, log: discard}
	fs := fwStatusStore{g}
	for round := range 20 {
		if err := st.SetOptOut(optOutFwStatus, false); err != nil {
			t.Fatal(err)
		}
		dev := fmt.Sprintf("d%d", round)
		start := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			if err := fs.PutFirmwareStatuses(map[string][]byte{dev: []byte(`{"state":"installed"}`)}); err != nil {
				t.Error(err)
			}
		}()
		go func() { // what the console's opt-out does
			defer wg.Done()
			<-start
			if err := st.SetOptOut(optOutFwStatus, true); err != nil {
				t.Error(err)
			}
			g.applyOptOuts(g.optOuts())
		}()
		close(start)
		wg.Wait()
		if stored, err := st.FirmwareStatuses(); err != nil || len(stored) != 0 {
			t.Fatalf("round %d: stored after the opt-out: %q %v, want none", round, stored, err)
		}
	}
}

// TestEraseDropsRetainedFromTheBroker: the console's erase of a device's
// data drops its retained MQTT messages from the running broker, not only
// from the store: a new subscriber to devices/{id}/# gets none of them.
// Before, the broker kept its copies and handed them out for up to an
// hour after their publish.
func TestEraseDropsRetainedFromTheBroker(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "sensor", "cert")
	m, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	// The broker sends a PUBACK before it hands the message to the
	// subscribers, so a subscriber made right after the PUBACK may get the
	// message live as well as retained, as MQTT allows. live waits until
	// the broker has handed both out, to a subscriber made before them:
	// a subscriber made after that gets the retained copies only.
	live := g.subscribeLocal(t, "devices/"+d.ID+"/#")
	topics := []string{"devices/" + d.ID + "/s/online", "devices/" + d.ID + "/t/temp"}
	for _, topic := range topics {
		if rc, err := m.PublishRetained(ctx, topic, []byte("1")); rc != 0 || err != nil {
			t.Fatalf("retained publish on %s: %#x %v", topic, rc, err)
		}
	}
	for seen := map[string]bool{}; len(seen) < len(topics); {
		select {
		case msg := <-live:
			if slices.Contains(topics, msg[0]) {
				seen[msg[0]] = true
			}
		case <-ctx.Done():
			t.Fatalf("the broker handed out only %v of %v live", seen, topics)
		}
	}
	retained := func() []string {
		var mu sync.Mutex
		var got []string
		cancel, err := g.g.mqtt.Subscribe("devices/"+d.ID+"/#", func(topic string, _ []byte) {
			mu.Lock()
			got = append(got, topic)
			mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
		cancel() // a subscriber gets the retained messages as it subscribes
		mu.Lock()
		defer mu.Unlock()
		return got
	}
	if got := retained(); len(got) != 2 {
		t.Fatalf("before the erase a new subscriber gets %v, want 2 retained messages", got)
	}
	api := newConsoleAPI(t, g.g)
	if code := api.do(t, "DELETE", "/api/v1/devices/"+d.ID+"/data", nil); code != http.StatusNoContent {
		t.Fatalf("erase: %d", code)
	}
	if got := retained(); len(got) != 0 {
		t.Errorf("after the erase a new subscriber to devices/%s/# gets %v, want nothing", d.ID, got)
	}
	if held, err := g.g.Store().RetainedUnder("devices/" + d.ID + "/"); err != nil || len(held) != 0 {
		t.Errorf("after the erase the store holds %d retained messages (%v), want none", len(held), err)
	}
	ev, err := g.g.Store().AuditLog(1, 0)
	if err != nil || len(ev) != 1 || ev[0].Action != "privacy.erase" || !strings.Contains(ev[0].Detail, "2 retained") {
		t.Errorf("last audit event %+v (%v), want privacy.erase with 2 retained messages", ev, err)
	}
}

// TestFirmwareStatusOptOutDropsRetained: switching firmware.status off
// drops the devices' retained firmware status reports (devices/{id}/s/fw)
// from the running broker and the store, and a report retained afterwards
// is kept by neither; the device's other retained messages stay. Before,
// the broker's retain hook stored every retained report whatever the
// opt-out said, and the broker kept its copy.
func TestFirmwareStatusOptOutDropsRetained(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "sensor", "cert")
	m, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	fw, online := "devices/"+d.ID+"/s/fw", "devices/"+d.ID+"/s/online"
	retain := func(topic string) {
		t.Helper()
		if rc, err := m.PublishRetained(ctx, topic, []byte(`{"state":"installed"}`)); rc != 0 || err != nil {
			t.Fatalf("retained publish on %s: %#x %v", topic, rc, err)
		}
	}
	kept := func() (broker, stored []string) {
		t.Helper()
		for _, topic := range []string{fw, online} {
			if _, ok := g.g.mqtt.Retained(topic); ok {
				broker = append(broker, topic)
			}
		}
		held, err := g.g.Store().RetainedUnder("devices/" + d.ID + "/")
		if err != nil {
			t.Fatal(err)
		}
		for topic := range held {
			stored = append(stored, topic)
		}
		slices.Sort(stored)
		return broker, stored
	}
	retain(fw)
	retain(online)
	if broker, stored := kept(); len(broker) != 2 || len(stored) != 2 {
		t.Fatalf("before the opt-out: broker %v, store %v; want both in each", broker, stored)
	}

	newConsoleAPI(t, g.g).optOut(t, optOutFwStatus, true)
	want := []string{online}
	if broker, stored := kept(); !slices.Equal(broker, want) || !slices.Equal(stored, want) {
		t.Errorf("after the opt-out: broker %v, store %v; want %v in each", broker, stored, want)
	}
	retain(fw)
	if broker, stored := kept(); !slices.Equal(broker, want) || !slices.Equal(stored, want) {
		t.Errorf("a report retained after the opt-out: broker %v, store %v; want %v in each", broker, stored, want)
	}
}

// TestFirmwareStatusOptOutDropsRetainedAtStart: a retained firmware status
// report stored while the opt-out was on (by a version before
// KeepRetained) is dropped from the store when the gateway starts, not
// only kept out of the broker: the opt-outs are applied once the MQTT
// broker exists.
func TestFirmwareStatusOptOutDropsRetainedAtStart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), testConfig(dir)); err != nil {
		t.Fatal(err)
	}
	opts := func() Options {
		return Options{Dev: true, StateDir: dir, Log: discard, Out: &bytes.Buffer{}, Sink: &testSink{}, Clock: &testpki.OffsetClock{}}
	}
	r := runGateway(t, opts(), 10*time.Second)
	d := (&tgw{running: r, dir: dir}).addDevice(t, "sensor", "cert")
	ctx := ctxT(t, 30*time.Second)
	m, err := d.DialMQTT(ctx, r.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	fw := "devices/" + d.ID + "/s/fw"
	if rc, err := m.PublishRetained(ctx, fw, []byte(`{"state":"installed"}`)); rc != 0 || err != nil {
		t.Fatalf("retained publish on %s: %#x %v", fw, rc, err)
	}
	m.Close()
	// Switched on in the store alone, as an older version left it: the
	// report still stored.
	if err := r.g.Store().SetOptOut(optOutFwStatus, true); err != nil {
		t.Fatal(err)
	}
	r.stop(t)

	r = runGateway(t, opts(), 10*time.Second)
	t.Cleanup(func() { r.stop(t) })
	if p, ok := r.g.mqtt.Retained(fw); ok {
		t.Errorf("after the restart the broker retains the report %q", p)
	}
	if held, err := r.g.Store().RetainedUnder("devices/" + d.ID + "/"); err != nil || len(held) != 0 {
		t.Errorf("after the restart the store holds %d retained messages (%v), want none", len(held), err)
	}
}

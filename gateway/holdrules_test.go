package gateway

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// within polls cond for up to d (a bound, not a wait: the link's first TLS
// handshakes are slow under the race-enabled suite).
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
	}
}

// TestUnreadableRulesHoldQueued: one record of the console's forwarding
// rules that does not decode makes them unreadable. The link then holds:
// the messages queued before, each acknowledged to its device, stay
// queued and unsent, a new message is refused as a full queue (its device
// keeps it), and the console shows an alarm. Once the rules can be read
// and are put in force again, the queued messages reach the cloud. The
// gateway used to put a local rule on # in force instead: the link
// deleted every queued message unsent and acknowledged new ones that it
// then dropped.
func TestUnreadableRulesHoldQueued(t *testing.T) {
	r, b, _, dir := startWithCloud(t)
	b.Stop(t) // the messages stay queued
	ctx := context.Background()
	for i := range 3 {
		m := bridges.Message{Device: "d1", Topic: "devices/d1/t/n", QoS: 1, Payload: []byte(`{"i":` + itoa(i) + `}`)}
		if err := r.g.sink.Accept(ctx, m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
	}
	r.stop(t)
	db, err := bolt.Open(filepath.Join(dir, "bastion.db"), 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("forward_rules"))
		if err == nil {
			err = b.Put([]byte("r99"), []byte("{not json"))
		}
		return err
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	b.Start(t)
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	r = start(t, dir, nil)
	defer r.stop(t)
	link := func() upstream.Status {
		return r.g.Status().Components["upstream"].(map[string]any)["link"].(upstream.Status)
	}
	// The link connects, reaches the first queued message and stops there
	// (or, wrongly, takes the queued messages out).
	within(t, 30*time.Second, "the link stopping at the held rules", func() bool {
		return strings.Contains(link().LastError, "privacy forwarding rules cannot be read") || r.g.queue.Stats().Depth != 3
	})
	if d := r.g.queue.Stats().Depth; d != 3 {
		t.Fatalf("queue depth %d with the rules unreadable, want the 3 queued messages", d)
	}
	if st := link(); st.Published != 0 || st.Withheld != 0 {
		t.Errorf("published %d, withheld %d with the rules unreadable; want 0, 0", st.Published, st.Withheld)
	}
	if err := r.g.sink.Accept(ctx, bridges.Message{Device: "d1", Topic: "devices/d1/t/n", QoS: 1, Payload: []byte(`{"i":3}`)}); !errors.Is(err, bridges.ErrQueueFull) {
		t.Errorf("Accept with the rules unreadable: %v, want bridges.ErrQueueFull (the device keeps it)", err)
	}
	rep, err := consoleUpstream{r.g}.Show(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if a := rep.Sections[0].Alarm; !strings.Contains(a, "privacy settings cannot be read") || !strings.Contains(a, "deletes nothing") || !strings.Contains(a, `"r99"`) {
		t.Errorf("console alarm %q, want the held link and the record to delete, r99", a)
	}
	// Putting the rules in force again (as a console change does) while
	// they cannot be read puts the hold in force and says so: the console
	// answered that change as a success.
	if err := r.g.applyForwardRules(); err == nil || !strings.Contains(err.Error(), "the upstream link holds") || !strings.Contains(err.Error(), `"r99"`) {
		t.Errorf("applyForwardRules with the rules unreadable: %v; want an error saying the link holds, naming r99", err)
	}
	if d := r.g.queue.Stats().Depth; d != 3 {
		t.Fatalf("queue depth %d after the rules were applied again unreadable, want the 3 queued messages", d)
	}
	// The operator deletes the bad record and saves a rule.
	if err := r.g.store.DeleteForwardRule("r99"); err != nil {
		t.Fatal(err)
	}
	if err := r.g.applyForwardRules(); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		select {
		case p := <-sub.Got:
			if !strings.HasSuffix(p.Topic, "/d1/t/n") {
				t.Errorf("cloud got %s, want d1's telemetry", p.Topic)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("the cloud got %d of the 3 held messages once the rules could be read; link %+v", i, link())
		}
	}
	if rep, err := (consoleUpstream{r.g}).Show(ctx); err != nil || strings.Contains(rep.Sections[0].Alarm, "privacy settings") {
		t.Errorf("console alarm %q (%v) once the rules are in force, want none about them", rep.Sections[0].Alarm, err)
	}
}

// TestFirmwareStatusOptOutKeptFromUpstream: while the firmware.status
// opt-out is on, firmware status reports (devices/{id}/s/fw, which MQTT
// devices publish as telemetry) do not go upstream, even where the
// forwarding rules name them; other status topics still do, and so do the
// reports once the opt-out is off. Before, the opt-out kept them from the
// store and the console only.
func TestFirmwareStatusOptOutKeptFromUpstream(t *testing.T) {
	r, _, _, dir := startWithCloud(t)
	defer r.stop(t)
	// Status topics mapped and forwarded too (the config writer writes
	// no uplink mappings).
	path := filepath.Join(dir, "bastion.yaml")
	cfg := *r.g.cfg.Load()
	cfg.Upstream.Forward = append(cfg.Upstream.Forward, upstream.Rule{Topic: "devices/+/s/#", Action: upstream.ActionForward})
	if err := WriteConfigFile(path, cfg); err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	up := `  uplink: [{local: "devices/{id}/t/#", remote: "{prefix}/{gateway}/{id}/t/#"}, {local: "devices/{id}/s/#", remote: "{prefix}/{gateway}/{id}/s/#"}]`
	if y2 := strings.Replace(string(y), "  uplink: []", up, 1); y2 == string(y) {
		t.Fatal("no uplink key in the written config")
	} else if err := os.WriteFile(path, []byte(y2), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.g.Reload(); err != nil {
		t.Fatal(err)
	}
	link := func() upstream.Status {
		return r.g.Status().Components["upstream"].(map[string]any)["link"].(upstream.Status)
	}
	ctx := context.Background()
	// send waits until the link has published or withheld the message, so
	// that a message's outcome is never counted for the next one's (a
	// queued message is withheld when the link reads it, after Accept).
	send := func(topic string) (withheldNow bool) {
		t.Helper()
		before := link()
		if err := r.g.sink.Accept(ctx, bridges.Message{Device: "d1", Topic: topic, QoS: 1, Payload: []byte(`{"state":"installed"}`)}); err != nil {
			t.Fatalf("Accept %s: %v", topic, err)
		}
		waitFor(t, topic+" published or withheld", func() bool {
			now := link()
			return now.Published+now.Withheld > before.Published+before.Withheld
		})
		return link().Withheld != before.Withheld
	}
	if send("devices/d1/s/fw") {
		t.Fatal("a firmware status report withheld with the opt-out off: the test's rules do not forward it")
	}
	api := newConsoleAPI(t, r.g)
	api.optOut(t, optOutFwStatus, true)
	if !send("devices/d1/s/fw") {
		t.Error("a firmware status report was forwarded upstream with the firmware.status opt-out on")
	}
	if send("devices/d1/s/online") {
		t.Error("another status topic withheld with the firmware.status opt-out on, want it forwarded")
	}
	api.optOut(t, optOutFwStatus, false)
	if send("devices/d1/s/fw") {
		t.Error("a firmware status report withheld after the opt-out was switched off")
	}
}

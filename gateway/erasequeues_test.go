package gateway

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/console"
)

// TestEraseDropsQueuedAndParked: the console's erase of a device's data
// deletes its telemetry the upstream link holds, queued and parked, and
// the export lists it first; another device's messages stay and are sent.
// Before, the erase left both queues alone: the queued messages reached
// the cloud after the erase, and the parked ones were kept for years,
// listed on the console with the device's id.
func TestEraseDropsQueuedAndParked(t *testing.T) {
	r, b, _, state := startWithBroker(t, "message_size_limit 200\n")
	defer r.stop(t)
	link := func() upstream.Status {
		return r.g.Status().Components["upstream"].(map[string]any)["link"].(upstream.Status)
	}
	within(t, 30*time.Second, "the upstream link connected", func() bool { return link().Connected })
	var ids []string
	for _, name := range []string{"erased", "kept"} {
		c, err := r.g.Devices().Add(AddRequest{Name: name, Auth: "psk"}, Actor{Name: "test"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, c.ID)
	}
	gone, kept := ids[0], ids[1]
	msg := func(dev, sub, payload string) bridges.Message {
		return bridges.Message{Device: dev, Topic: "devices/" + dev + "/t/" + sub, QoS: 1, Payload: []byte(payload)}
	}
	ctx := context.Background()
	// Above the broker's message_size_limit: refused for good, parked.
	big := msg(gone, "big", `{"pad":"`+strings.Repeat("x", 400)+`"}`)
	if err := r.g.sink.Accept(ctx, big); err != nil {
		t.Fatal(err)
	}
	within(t, 30*time.Second, "the large message parked", func() bool { return r.g.parking.Stats().Depth == 1 && r.g.queue.Stats().Depth == 0 })
	b.Stop(t) // the rest stays queued
	within(t, 30*time.Second, "the upstream link down", func() bool { return !link().Connected })
	for _, m := range []bridges.Message{msg(gone, "a", `{"a":1}`), msg(kept, "k", `{"k":1}`), msg(gone, "b", `{"b":2}`)} {
		if err := r.g.sink.Accept(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	api := newConsoleAPI(t, r.g)
	var ex struct {
		Upstream console.UpstreamMessages `json:"upstream"`
	}
	if code := api.do(t, "GET", "/api/v1/devices/"+gone+"/export", &ex); code != http.StatusOK {
		t.Fatalf("export: %d", code)
	}
	type row struct{ Queue, Topic, Payload, Refused string }
	var got []row
	for _, m := range ex.Upstream.Messages {
		got = append(got, row{m.Queue, m.Topic, string(m.Payload), m.Refused[:min(len(m.Refused), 22)]})
	}
	want := []row{
		{"queued", "devices/" + gone + "/t/a", `{"a":1}`, ""},
		{"queued", "devices/" + gone + "/t/b", `{"b":2}`, ""},
		{"parked", big.Topic, string(big.Payload), "PUBACK reason 0x95 (pa"},
	}
	if d := cmp.Diff(want, got); d != "" || ex.Upstream.Queued != 2 || ex.Upstream.Parked != 1 || ex.Upstream.Truncated {
		t.Errorf("exported upstream messages: %d queued, %d parked, truncated %v (-want +got):\n%s", ex.Upstream.Queued, ex.Upstream.Parked, ex.Upstream.Truncated, d)
	}
	if code := api.do(t, "DELETE", "/api/v1/devices/"+gone+"/data", nil); code != http.StatusNoContent {
		t.Fatalf("erase: %d", code)
	}
	if q, p := r.g.queue.Stats().Depth, r.g.parking.Stats().Depth; q != 1 || p != 0 {
		t.Errorf("after the erase the queue holds %d messages and the parking queue %d, want 1 (the other device's) and 0", q, p)
	}
	ev, err := r.g.Store().AuditLog(1, 0)
	if err != nil || len(ev) != 1 || ev[0].Action != "privacy.erase" || !strings.Contains(ev[0].Detail, "2 queued and 1 parked upstream message(s) deleted") {
		t.Errorf("last audit event %+v (%v), want privacy.erase with 2 queued and 1 parked messages", ev, err)
	}
	// On disk at once: a power cut right after the erase brings none back.
	// Before, the deletions waited up to a second in memory.
	for _, c := range []struct {
		dir  string
		want []string
	}{{"queue", []string{kept}}, {"parked", nil}} {
		if got := devicesOnDisk(t, filepath.Join(state, c.dir)); !slices.Equal(got, c.want) {
			t.Errorf("the queue in %s, opened from its disk right after the erase, holds messages of %q, want %q", c.dir, got, c.want)
		}
	}
	b.Start(t)
	within(t, 60*time.Second, "the other device's message sent", func() bool { return r.g.queue.Stats().Depth == 0 })
	if n := link().Published; n != 1 {
		t.Errorf("published %d messages after the erase, want only the other device's", n)
	}
}

// devicesOnDisk opens a copy of the queue in dir as its files are now
// (what a power cut would leave of what was written and synced, and
// more) and returns the devices of the messages it holds.
func devicesOnDisk(t *testing.T, dir string) []string {
	t.Helper()
	cp := t.TempDir()
	if err := os.CopyFS(cp, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	q, err := queue.Open(cp, queue.Options{MaxAge: 100 * 365 * 24 * time.Hour}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	es, err := q.Held(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, e := range es {
		devs = append(devs, e.Device)
	}
	return devs
}

package console

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/store"
)

// fakeTraffic answers Counters from a map.
type fakeTraffic map[string]DeviceCounters

func (f fakeTraffic) Counters(ctx context.Context, device string) (DeviceCounters, bool) {
	c, ok := f[device]
	return c, ok
}

// The device list shows when each device was last seen, from the bridges'
// traffic as the device's own page does; a device with no traffic (never
// seen since start, or the device.last_seen opt-out on, which makes the
// hub keep none) shows never. The list used to show never for every
// device: the store's LastSeen is never written.
func TestDeviceListShowsLastSeen(t *testing.T) {
	h, srv, clk := newTestHandler(t)
	c, _ := setUpAdmin(t, srv)
	seen := clk.now().Add(-5 * time.Minute).Truncate(time.Second)
	for _, d := range []store.Device{{ID: "d1", Name: "lamp", Auth: "psk"}, {ID: "d2", Name: "plug", Auth: "psk"}, {ID: "d3", Name: "thermo", Auth: "psk"}} {
		if err := h.o.Store.AddDevice(d); err != nil {
			t.Fatal(err)
		}
	}
	h.SetComponents(Components{Traffic: fakeTraffic{
		"d1": {MessagesIn: 3, LastSeen: seen},
		"d2": {MessagesIn: 1}, // last seen opted out: counters only
	}})

	res, err := c.Get(srv.URL + "/api/v1/devices")
	if err != nil {
		t.Fatal(err)
	}
	var ds []store.Device
	err = json.NewDecoder(res.Body).Decode(&ds)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/v1/devices: %d %v", res.StatusCode, err)
	}
	got := map[string]time.Time{}
	for _, d := range ds {
		got[d.ID] = d.LastSeen
	}
	if d := cmp.Diff(map[string]time.Time{"d1": seen, "d2": {}, "d3": {}}, got); d != "" {
		t.Errorf("API last seen (-want +got):\n%s", d)
	}

	res, err = c.Get(srv.URL + "/devices")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	page := string(b)
	want := seen.UTC().Format("2006-01-02 15:04 UTC")
	for _, row := range []struct{ id, when string }{{"d1", want}, {"d2", "never"}, {"d3", "never"}} {
		_, rest, ok := strings.Cut(page, "<code>"+row.id+"</code>")
		if cell, _, _ := strings.Cut(rest, "</tr>"); !ok || !strings.Contains(cell, "<td>"+row.when+"</td>") {
			t.Errorf("device page row of %s: %q, want last seen %q", row.id, cell, row.when)
		}
	}
}

package gateway

import (
	"net/http"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/gateway/store"
)

// The console's device list shows when a device last sent telemetry, as
// its own page does, and nothing once device.last_seen is opted out. It
// used to show every device as never seen.
func TestConsoleDeviceListLastSeen(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "flowmeter", "psk")
	idle := g.addDevice(t, "idle", "psk")
	co, err := d.DialCoAP(ctx, g.coapAddr(d))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	if r, err := co.Publish(ctx, "flow", []byte("7")); err != nil || r.Code != codes.Changed {
		t.Fatalf("publish: %v %v", r, err)
	}
	api := newConsoleAPI(t, g.g)
	lastSeen := func() map[string]time.Time {
		t.Helper()
		var ds []store.Device
		if code := api.do(t, "GET", "/api/v1/devices", &ds); code != http.StatusOK {
			t.Fatalf("GET /api/v1/devices: %d", code)
		}
		out := map[string]time.Time{}
		for _, d := range ds {
			out[d.ID] = d.LastSeen
		}
		return out
	}
	got := lastSeen()
	if got[d.ID].IsZero() || !got[idle.ID].IsZero() {
		t.Errorf("last seen %v, want %s's time and none for %s", got, d.ID, idle.ID)
	}
	api.optOut(t, optOutLastSeen, true)
	if got := lastSeen(); !got[d.ID].IsZero() {
		t.Errorf("last seen of %s after opting out: %v, want none", d.ID, got[d.ID])
	}
}

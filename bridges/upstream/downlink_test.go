package upstream

import (
	"context"
	"log/slog"
	"testing"

	"github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

// A command from the cloud for a device that neither observes nor
// subscribes is kept by the hub but counted result="no_receiver", not
// "delivered" (the hub used to answer nil either way and the link counted
// every such command as delivered); with an observer it is "delivered".
//
// Mutation that fails it: the errors.Is(err, bridges.ErrNoReceiver) branch
// in downlink removed (the error then counts as "refused"), or hub.Downlink
// returning nil when nobody received the command (counted "delivered").
func TestDownlinkNoReceiverCounted(t *testing.T) {
	h, err := hub.New(hub.LocalSink{}, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	u := &Upstream{log: slog.New(slog.DiscardHandler), m: newMetrics(), deliver: h.Downlink}
	u.cur.Store(&snapshot{cfg: c, routes: rs})
	ctx := context.Background()
	count := func() (delivered, none, refused float64) {
		return testutil.ToFloat64(u.m.downlink.WithLabelValues("delivered")),
			testutil.ToFloat64(u.m.downlink.WithLabelValues("no_receiver")),
			testutil.ToFloat64(u.m.downlink.WithLabelValues("refused"))
	}

	u.downlink(ctx, &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("on")})
	if d, n, r := count(); d != 0 || n != 1 || r != 0 {
		t.Fatalf("no observer: delivered=%v no_receiver=%v refused=%v, want 0 1 0", d, n, r)
	}
	if st := u.Status(); st.Downlink != 0 {
		t.Errorf("Status().Downlink = %d with nobody listening, want 0", st.Downlink)
	}
	if m, ok := h.LastCommand("devices/dev1/c/led"); !ok || string(m.Payload) != "on" {
		t.Errorf("the command is not kept for the device's next GET: %q %v", m.Payload, ok)
	}

	var got []string
	cancel := h.Observe("dev1", "devices/dev1/c", func(m bridges.Message) { got = append(got, string(m.Payload)) })
	defer cancel()
	u.downlink(ctx, &paho.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, Payload: []byte("off")})
	if d, n, r := count(); d != 1 || n != 1 || r != 0 {
		t.Fatalf("with an observer: delivered=%v no_receiver=%v refused=%v, want 1 1 0", d, n, r)
	}
	if st := u.Status(); st.Downlink != 1 || len(got) != 1 {
		t.Errorf("Status().Downlink = %d, observer got %q; want 1 and [off]", st.Downlink, got)
	}
}

package coap_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/netns"
)

// A command notification the DTLS listener's socket had no room for
// (pion-dtls patch (52): dropped, counted in
// bastion_transport_datagrams_dropped_total, the write reported as sent)
// is not counted as a command sent (messages_total{coap,command}), and the
// hub is not told a session received it (DeliverReached, Downlink's
// ErrNoReceiver). Before, every notification written was counted as sent
// and as received, dropped or not.
//
// The gateway listens in a network namespace of its own, joined to the
// device's by a veth pair. Once the device observes, the gateway's end of
// the pair holds its egress in a token bucket of one byte a second (tc
// tbf), so every datagram it sends stays charged to the listener's
// socket, which is full after a few hundred; commands are delivered until
// some are dropped. Each notification is then either sent or dropped:
// sent + dropped = delivered, and the sessions the hub was told received
// a command are the ones sent.
func TestDroppedNotificationNotCountedAsSent(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "tc")
	gw := netns.New(t, "cdropg")
	devNS := netns.New(t, "cdropd")
	netns.Veth(t, gw, "cdg", devNS, "cdd")
	gw.AddAddr("cdg", "10.251.7.1/30")
	devNS.AddAddr("cdd", "10.251.7.2/30")
	// Static neighbours: nothing waits for an ARP answer behind the
	// stalled qdisc.
	mac := func(ns *netns.NS, ifname string) string {
		return strings.TrimSpace(ns.MustRun("cat", "/sys/class/net/"+ifname+"/address"))
	}
	gw.MustRun("ip", "neigh", "replace", "10.251.7.2", "lladdr", mac(devNS, "cdd"), "dev", "cdg", "nud", "permanent")
	devNS.MustRun("ip", "neigh", "replace", "10.251.7.1", "lladdr", mac(gw, "cdg"), "dev", "cdd", "nud", "permanent")

	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	var s *coap.Server
	var pskDev *devicesim.Device
	var pskAddr string
	if err := gw.Do(func() error {
		s, pskDev, _, pskAddr, _, _ = startWith(t, id, nopSink{}, coap.Config{Listen: "10.251.7.1:0", PSKListen: "10.251.7.1:0"}, nil, 0)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var d *rawDevice
	if err := devNS.Do(func() error {
		d = dialRaw(t, pskDev, pskAddr)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	d.sendObserve(1, "/c/x")
	if o := d.nextObserved(); o.typ != message.Acknowledgement || o.seq < 0 {
		t.Fatalf("observe registration answered with %v, want an ACK with Observe", o)
	}

	// A datagram from the gateway drains every minute or two: nothing it
	// sends from now on leaves during the test.
	gw.MustRun("tc", "qdisc", "add", "dev", "cdg", "root", "tbf", "rate", "8bit", "burst", "225", "limit", "1000000")

	h := coap.HubOf(s)
	m := h.Metrics()
	sent := func() float64 { return testutil.ToFloat64(m.Messages.WithLabelValues(hub.CoAP, "command")) }
	dropped := func() float64 { return testutil.ToFloat64(m.Dropped.WithLabelValues(hub.CoAP)) }
	before := sent()
	ctx := context.Background()
	delivered, reached := 0, 0
	// A few hundred fill the socket's send buffer; then some more, all
	// dropped.
	for dropped() < 20 {
		if delivered == 20000 {
			t.Fatalf("%d commands delivered and %v datagrams dropped: the socket never filled (the qdisc did not hold the datagrams)", delivered, dropped())
		}
		ok, err := h.DeliverReached(ctx, bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte("go")})
		if err != nil {
			t.Fatal(err)
		}
		delivered++
		if ok {
			reached++
		}
	}
	got := sent() - before
	if got+dropped() != float64(delivered) {
		t.Errorf("%d notifications written: messages_total{coap,command} counted %v sent and %v were dropped, want sent + dropped = %d",
			delivered, got, dropped(), delivered)
	}
	if float64(reached) != got {
		t.Errorf("the hub was told %d notifications were received by a session, %v were sent", reached, got)
	}
	// The socket is still full: the next command's notification is
	// dropped, and a caller counting deliveries hears that no session
	// received it.
	n := dropped()
	if err := h.Downlink(ctx, bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte("go")}); !errors.Is(err, bridges.ErrNoReceiver) || dropped() != n+1 {
		t.Errorf("a command whose notification was dropped (dropped %v -> %v): Downlink = %v, want %v", n, dropped(), err, bridges.ErrNoReceiver)
	}
}

package coap_test

import (
	"context"
	"encoding/hex"
	"net"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/netns"
)

// Handshakes from two IPv6 addresses of one /64 share the /64's limit
// (coap.Config.MaxHandshakesPerPrefix): a host on an IPv6 link can use any
// address of the link's /64, and with a limit per address only it took a
// new address for every handshake. In a network namespace of its own with
// fd00::1-3/64, a server with 2 handshakes per address and 3 per /64;
// clients that stall after the cookie echo (their PSK callback waits, so
// the server waits for their next flight): two from fd00::2 and one from
// fd00::3 are held, the second from fd00::3 is refused (handshake_limit),
// though its address has room.
func TestHandshakesLimitedPerIPv6Prefix(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	ns := netns.New(t, "coap64")
	for _, a := range []string{"fd00::1/64", "fd00::2/64", "fd00::3/64"} {
		ns.AddAddr("lo", a)
	}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	var s *coap.Server
	var pskAddr string
	if err := ns.Do(func() error {
		s, _, _, pskAddr, _, _ = startWith(t, id, nopSink{}, coap.Config{Listen: "[fd00::1]:0", PSKListen: "[fd00::1]:0",
			MaxHandshakesPerSource: 2, MaxHandshakesPerPrefix: 3}, nil, 0)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp6", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stalled := *cfg
	stalled.PSK = func(hint []byte) ([]byte, error) {
		<-ctx.Done() // the end of the test
		return cfg.PSK(hint)
	}
	handshake := func(from string) {
		t.Helper()
		var pc net.PacketConn
		if err := ns.Do(func() error {
			var err error
			pc, err = net.ListenPacket("udp6", "["+from+"]:0")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		c, err := piondtls.Client(pc, raddr, &stalled)
		if err != nil {
			pc.Close()
			t.Fatal(err)
		}
		t.Cleanup(func() { cancel(); c.Close() })
		go c.HandshakeContext(ctx)
	}
	refusals := func() float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit))
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d handshakes in flight, %v refused", what, coap.HandshakesInFlight(s), refusals())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for i, from := range []string{"fd00::2", "fd00::2", "fd00::3"} {
		handshake(from)
		waitFor("handshake "+from+" held", func() bool { return coap.HandshakesInFlight(s) == i+1 })
	}
	if n := refusals(); n != 0 {
		t.Fatalf("%v handshakes refused within the limits", n)
	}
	handshake("fd00::3")
	waitFor("the fourth handshake of fd00::/64 refused", func() bool { return refusals() >= 1 })
	if n := coap.HandshakesInFlight(s); n != 3 {
		t.Errorf("%d handshakes in flight, want the /64's 3", n)
	}
}

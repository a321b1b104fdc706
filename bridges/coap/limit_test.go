package coap_test

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/netns"
)

// Handshakes from the addresses of one IPv6 /64 share the /64's limit
// (coap.Config.MaxHandshakesPerPrefix), and a handshake over it ends the
// /64's oldest one in flight instead of being refused: a host on an IPv6
// link can use any address of the link's /64, and with a limit per
// address only it took a new address for every handshake; with a /64
// limit that refused, a host of the /64 that echoes cookies and then
// stalls its handshakes held the /64's places and kept out every other
// device of it. In a network namespace of its own with fd00::1-5/64, a
// server with 2 handshakes per address and 3 per /64; clients that stall
// after the cookie echo (their PSK callback waits, so the server waits for
// their next flight) from fd00::2 (twice) and fd00::3 fill the /64. A third
// from fd00::2 is refused (its address's limit). A device from fd00::4
// then does its handshake and a request, the oldest stalled handshake
// (fd00::2's first) ended for it; the /64 filled again by fd00::3, a
// device from fd00::5 ends the next oldest, fd00::2's second.
func TestHandshakesLimitedPerIPv6Prefix(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	ns := netns.New(t, "coap64")
	for _, a := range []string{"fd00::1/64", "fd00::2/64", "fd00::3/64", "fd00::4/64", "fd00::5/64"} {
		ns.AddAddr("lo", a)
	}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	var s *coap.Server
	var pskAddr string
	lines := &coap.LogLines{}
	if err := ns.Do(func() error {
		s, _, _, pskAddr, _, _ = startWith(t, id, nopSink{}, coap.Config{Listen: "[fd00::1]:0", PSKListen: "[fd00::1]:0",
			MaxHandshakesPerSource: 2, MaxHandshakesPerPrefix: 3}, slog.New(lines), 0)
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
	stalled := stalling(ctx, cfg)
	client := func(from string, cfg *piondtls.Config) *piondtls.Conn {
		t.Helper()
		var pc net.PacketConn
		if err := ns.Do(func() error {
			var err error
			pc, err = net.ListenPacket("udp6", "["+from+"]:0")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return dtlsClient(t, cancel, pc, raddr, cfg)
	}
	stall := func(from string) { go client(from, stalled).HandshakeContext(ctx) }
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
	inFlightFrom := func(want map[string]int) {
		t.Helper()
		for addr, n := range want {
			if got := coap.HandshakesInFlightFrom(s, addr); got != n {
				t.Errorf("%d handshakes in flight from %s, want %d", got, addr, n)
			}
		}
	}
	// device does a handshake from the address from and a request.
	device := func(from string) {
		t.Helper()
		c := client(from, cfg)
		hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
		defer hcancel()
		if err := c.HandshakeContext(hctx); err != nil {
			t.Fatalf("handshake of a device from %s, its /64 full of stalled handshakes: %v", from, err)
		}
		d := &rawDevice{t: t, dc: c}
		d.send(1, codes.GET, "/.well-known/core", nil)
		d.expect("a request of the device from "+from, 1, codes.Content)
		c.Close()
	}
	for i, from := range []string{"fd00::2", "fd00::2", "fd00::3"} {
		stall(from)
		waitFor("handshake "+from+" held", func() bool { return coap.HandshakesInFlight(s) == i+1 })
	}
	if n := refusals(); n != 0 {
		t.Fatalf("%v handshakes refused within the limits", n)
	}
	// Over its address's limit: refused, nothing ended.
	stall("fd00::2")
	waitFor("the third handshake of fd00::2 refused", func() bool { return refusals() >= 1 })
	inFlightFrom(map[string]int{"fd00::2": 2, "fd00::3": 1})

	device("fd00::4")
	waitFor("the device's handshake done", func() bool { return coap.HandshakesInFlight(s) == 2 })
	inFlightFrom(map[string]int{"fd00::2": 1, "fd00::3": 1, "fd00::4": 0})
	stall("fd00::3")
	waitFor("the /64 full again", func() bool { return coap.HandshakesInFlight(s) == 3 })
	device("fd00::5")
	waitFor("the second device's handshake done", func() bool { return coap.HandshakesInFlight(s) == 2 })
	inFlightFrom(map[string]int{"fd00::2": 0, "fd00::3": 2, "fd00::5": 0})
	if n := refusals(); n != 3 {
		t.Errorf("handshake_limit counted %v times, want 3: one refusal, two handshakes ended", n)
	}
	// The server's ends of the two ended: their handshakes returned.
	ended := func() (from []string) {
		for _, a := range lines.Attrs("coap: handshake failed") {
			if strings.Contains(a["err"], "ended for a newer handshake") {
				from = append(from, a["remote"])
			}
		}
		return from
	}
	waitFor("the ended handshakes to return", func() bool { return len(ended()) == 2 })
	for _, r := range ended() {
		if !strings.HasPrefix(r, "[fd00::2]:") {
			t.Errorf("a handshake from %s was ended, want only fd00::2's", r)
		}
	}
}

// Past the total (coap.Config.MaxHandshakes) the oldest handshake in
// flight of all ends for a new one, as past a /64's limit: refused, a LAN
// host that claims a few dozen unused IPv4 addresses (each a source of its
// own, per-address limits only) and stalls a handshake from each kept
// every device out. Loopback: stalled handshakes from 127.0.0.2 (twice)
// and 127.0.0.3 fill a total of 3; a device from 127.0.0.4 does its
// handshake and a request, 127.0.0.2's first handshake ended for it.
func TestHandshakesOverTotalEndTheOldest(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{MaxHandshakesPerSource: 2, MaxHandshakes: 3}, slog.New(lines), 0)
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stalled := stalling(ctx, cfg)
	client := func(from string, cfg *piondtls.Config) *piondtls.Conn {
		t.Helper()
		pc, err := net.ListenPacket("udp4", from+":0")
		if err != nil {
			t.Fatal(err)
		}
		return dtlsClient(t, cancel, pc, raddr, cfg)
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d handshakes in flight", what, coap.HandshakesInFlight(s))
			}
		}
	}
	for i, from := range []string{"127.0.0.2", "127.0.0.2", "127.0.0.3"} {
		go client(from, stalled).HandshakeContext(ctx)
		waitFor("handshake from "+from+" held", func() bool { return coap.HandshakesInFlight(s) == i+1 })
	}
	c := client("127.0.0.4", cfg)
	hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
	defer hcancel()
	if err := c.HandshakeContext(hctx); err != nil {
		t.Fatalf("handshake of a device with every handshake place held by stalled ones: %v", err)
	}
	d := &rawDevice{t: t, dc: c}
	d.send(1, codes.GET, "/.well-known/core", nil)
	d.expect("a request of the device", 1, codes.Content)
	if got := coap.HandshakesInFlightFrom(s, "127.0.0.2"); got != 1 {
		t.Errorf("%d handshakes in flight from 127.0.0.2, want 1 (its first ended)", got)
	}
	if n := testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit)); n != 1 {
		t.Errorf("handshake_limit counted %v times, want 1: the handshake ended", n)
	}
	waitFor("the ended handshake to return", func() bool {
		for _, a := range lines.Attrs("coap: handshake failed") {
			if strings.Contains(a["err"], "ended for a newer handshake") && strings.HasPrefix(a["remote"], "127.0.0.2:") {
				return true
			}
		}
		return false
	})
}

// A handshake evicted just after it succeeded (after its context could
// end it, before its slot was given back) is ended, as the refusal it was
// counted as: the eviction counted it handshake_limit, and before, it
// carried on as a session. Loopback, a total of 1: a device from
// 127.0.0.2 completes its handshake, and in that window (the server's
// handshake hook) a stalled handshake from 127.0.0.3 takes its slot. The
// device's session is closed by the server, counted once as
// handshake_limit and not as a handshake ok.
func TestHandshakeEvictedAsItCompletesIsEnded(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{MaxHandshakes: 1}, slog.New(lines), 0)
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := func(from string, cfg *piondtls.Config) *piondtls.Conn {
		t.Helper()
		pc, err := net.ListenPacket("udp4", from+":0")
		if err != nil {
			t.Fatal(err)
		}
		return dtlsClient(t, cancel, pc, raddr, cfg)
	}
	refusals := func() float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonHandshakeLimit))
	}
	stalled := client("127.0.0.3", stalling(ctx, cfg))
	var once sync.Once
	coap.SetHandshakeHook(s, func() {
		once.Do(func() {
			go stalled.HandshakeContext(ctx)
			// Its cookie echo evicts the device's handshake, the oldest.
			for deadline := time.Now().Add(10 * time.Second); refusals() == 0 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
			}
		})
	})
	c := client("127.0.0.2", cfg)
	hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
	defer hcancel()
	if err := c.HandshakeContext(hctx); err != nil {
		t.Fatalf("device handshake: %v", err)
	}
	ended := func() bool {
		for _, a := range lines.Attrs("coap: handshake failed") {
			if strings.Contains(a["err"], "ended for a newer handshake") && strings.HasPrefix(a["remote"], "127.0.0.2:") {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(10 * time.Second); !ended() && s.SessionCount() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the device's handshake neither ended nor became a session")
		}
	}
	if n := s.SessionCount(); n != 0 {
		t.Fatalf("%d sessions open: the handshake counted as refused carried on", n)
	}
	// The server closed it: the device reads the end of the session.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if _, err := c.Read(make([]byte, 64)); err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Errorf("device's read after its session was ended: %v, want the connection closed", err)
	}
	if n := refusals(); n != 1 {
		t.Errorf("handshake_limit counted %v times, want 1", n)
	}
	m := coap.HubOf(s).Metrics().Handshakes
	if ok, failed := testutil.ToFloat64(m.WithLabelValues(hub.CoAP, "ok")), testutil.ToFloat64(m.WithLabelValues(hub.CoAP, "failed")); ok != 0 || failed != 0 {
		t.Errorf("handshakes ok %v, failed %v; want 0 and 0 (counted handshake_limit only)", ok, failed)
	}
}

// stalling is cfg for a client that stalls its handshake after the cookie
// echo: its PSK callback waits for ctx (the end of the test), so the server
// waits for its next flight.
func stalling(ctx context.Context, cfg *piondtls.Config) *piondtls.Config {
	stalled := *cfg
	stalled.PSK = func(hint []byte) ([]byte, error) {
		<-ctx.Done()
		return cfg.PSK(hint)
	}
	return &stalled
}

// dtlsClient is a DTLS client on pc to raddr, closed (after cancel, which
// ends the stalled ones) when the test ends.
func dtlsClient(t *testing.T, cancel context.CancelFunc, pc net.PacketConn, raddr *net.UDPAddr, cfg *piondtls.Config) *piondtls.Conn {
	t.Helper()
	c, err := piondtls.Client(pc, raddr, cfg)
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); c.Close() })
	return c
}

// A handshake in progress when the server stops is ended by the stop, not
// failed: it is not counted as a failed handshake.
func TestHandshakeEndedByShutdownNotFailed(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, _, _, pskAddr, _, stop := startWith(t, id, nopSink{}, coap.Config{}, nil, 0)
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pc, err := net.ListenPacket("udp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	c := dtlsClient(t, cancel, pc, raddr, stalling(ctx, cfg))
	go c.HandshakeContext(ctx)
	for deadline := time.Now().Add(10 * time.Second); coap.HandshakesInFlight(s) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stalled handshake was never counted in flight")
		}
	}
	stop() // Run has returned: every handshake has ended
	if got := testutil.ToFloat64(coap.HubOf(s).Metrics().Handshakes.WithLabelValues(hub.CoAP, "failed")); got != 0 {
		t.Errorf("failed handshakes %v after a shutdown ended one in progress, want 0", got)
	}
}

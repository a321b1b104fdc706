package coap_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

// startObserveServer runs a Server with a PSK listener on loopback and
// returns its hub (to deliver commands), the PSK device and its address.
// prep runs before Run (test hooks).
func startObserveServer(t *testing.T, prep func(*coap.Server)) (*hub.Hub, *devicesim.Device, string) {
	t.Helper()
	return startObserveServerWith(t, coap.Config{}, prep)
}

// startObserveServerWith is startObserveServer with cfg (its listen
// addresses are set here).
func startObserveServerWith(t *testing.T, cfg coap.Config, prep func(*coap.Server)) (*hub.Hub, *devicesim.Device, string) {
	t.Helper()
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir()
	ca, err := pki.Open(filepath.Join(dir, "pki"), "test", pki.SystemClock{}, log)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ca.ServerCert("coap", []string{"127.0.0.1"}, 24*time.Hour, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	h, err := hub.New(hub.LocalSink{}, prometheus.NewRegistry(), log)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listen, cfg.PSKListen = "127.0.0.1:0", "127.0.0.1:0"
	s, err := coap.New(cfg, sc, id, h, log)
	if err != nil {
		t.Fatal(err)
	}
	if prep != nil {
		prep(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	_, p := s.Addrs()
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	return h, dev, p.String()
}

// sendObserve sends GET path with Observe: 0 as a confirmable request.
func (d *rawDevice) sendObserve(mid uint16, path string) {
	d.t.Helper()
	m := pool.NewMessage(context.Background())
	m.SetCode(codes.GET)
	m.SetType(message.Confirmable)
	m.SetMessageID(int32(mid))
	m.SetToken(tokenOf(mid))
	m.SetObserve(0)
	if err := m.SetPath(path); err != nil {
		d.t.Fatal(err)
	}
	raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.dc.Write(raw); err != nil {
		d.t.Fatal(err)
	}
}

// observed is one datagram of an observation as the device saw it.
type observed struct {
	typ     message.Type
	token   string
	seq     int64 // -1: no Observe option
	payload string
}

func (o observed) String() string {
	return fmt.Sprintf("%v token %q Observe %d %q", o.typ, o.token, o.seq, o.payload)
}

// nextObserved reads the next datagram (10 s at most).
func (d *rawDevice) nextObserved() observed {
	d.t.Helper()
	o, err := d.readObserved(10 * time.Second)
	if err != nil {
		d.t.Fatalf("no datagram from the gateway: %v", err)
	}
	return o
}

// readObserved reads the next datagram, waiting at most wait.
func (d *rawDevice) readObserved(wait time.Duration) (observed, error) {
	d.t.Helper()
	buf := make([]byte, 4096)
	_ = d.dc.SetReadDeadline(time.Now().Add(wait))
	n, err := d.dc.Read(buf)
	if err != nil {
		return observed{}, err
	}
	m := pool.NewMessage(context.Background())
	if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
		d.t.Fatalf("datagram does not decode: %v", err)
	}
	o := observed{typ: m.Type(), token: string(m.Token()), seq: -1}
	if v, err := m.Observe(); err == nil {
		o.seq = int64(v)
	}
	if b := m.Body(); b != nil {
		p, _ := io.ReadAll(b)
		o.payload = string(p)
	}
	return o, nil
}

// A command delivered while a device registers with GET /c Observe
// reaches it exactly once, and never ahead of the registration answer:
// command Y comes after the route decided the request is a registration
// and before it registered (it must be in the answer: the last command is
// read atomically with the registration), command Z after the
// registration and before the answer is written (it must be notified
// after the answer, with a higher Observe number). The audit's
// TestAuditObserveRegistrationLosesCommand found Y lost (the last command
// was read in route, the registration came later in answer); a
// notification could also overtake the answer, which then carried a
// higher number with an older command.
//
// Mutations that fail it: reading the last command in route again
// (LastCommand in Server.command) gives the answer X and loses Y;
// starting an observation not held (held: false in session.observe)
// sends Z's notification before the answer.
func TestObserveRegistrationRace(t *testing.T) {
	// The hook reads the hub on the listener's read loop, which the
	// request reaches through the kernel (pion's raw reads): the race
	// detector sees no order between that and the assignment below.
	var hp atomic.Pointer[hub.Hub]
	ctx := context.Background()
	topic := "devices/dev-psk/c/x"
	deliver := func(p string) {
		if err := hp.Load().Deliver(ctx, bridges.Message{Device: "dev-psk", Topic: topic, Payload: []byte(p)}); err != nil {
			t.Error(err)
		}
	}
	h, dev, addr := startObserveServer(t, func(s *coap.Server) {
		coap.SetObserveHook(s, func(stage int) {
			switch stage {
			case coap.HookRouted:
				deliver("Y")
			case coap.HookRegistered:
				deliver("Z")
			}
		})
	})
	hp.Store(h)
	deliver("X")
	d := dialRaw(t, dev, addr)
	d.sendObserve(1, "/c/x")
	ans := d.nextObserved()
	if ans.typ != message.Acknowledgement || ans.token != string(tokenOf(1)) || ans.seq < 0 || ans.payload != "Y" {
		t.Fatalf("first datagram: %v; want the ACK of the registration with an Observe number and command Y", ans)
	}
	n := d.nextObserved()
	if n.typ != message.NonConfirmable || n.token != string(tokenOf(1)) || n.payload != "Z" || n.seq <= ans.seq {
		t.Fatalf("second datagram: %v; want the notification of Z with an Observe number above the answer's %d", n, ans.seq)
	}
}

// Notifications of one session go out with Observe numbers that never go
// backwards, also when commands are delivered from several goroutines at
// once (the downlink, the console, firmware offers). The number used to be
// taken under the session's lock and the datagram written after it was
// released, so two deliveries could write in the other order.
//
// Two locks keep the order, each enough alone: the session's (numbering
// and writing under se.mu, session.send) and the hub's delivery lock
// (hub.Deliver calls observers under dmu). Mutation that fails it: both
// taken away (se.mu released between numbering and writing in
// session.notify, and the observers called after dmu.Unlock in
// hub.DeliverReached): numbers go backwards within a few hundred
// notifications. Either one alone passes.
func TestObserveNumbersNeverGoBackwards(t *testing.T) {
	h, dev, addr := startObserveServer(t, nil)
	d := dialRaw(t, dev, addr)
	d.sendObserve(1, "/c/x")
	ans := d.nextObserved()
	if ans.typ != message.Acknowledgement || ans.seq < 0 {
		t.Fatalf("registration answer: %v", ans)
	}
	const per = 1000
	ctx := context.Background()
	// The reader counts what arrived; the deliverers let it catch up every
	// 100 commands each, so that the datagrams in flight fit the client's
	// socket buffer on a loaded machine (with all 2000 back to back, most
	// were dropped when the package's tests ran beside others).
	var arrived atomic.Int64
	catchUp := func(n int64) {
		// Until it is close, or it has read nothing for 100 ms (the rest
		// of those datagrams were lost).
		last, idle := arrived.Load(), time.Now()
		for arrived.Load() < n-20 && time.Since(idle) < 100*time.Millisecond {
			time.Sleep(time.Millisecond)
			if a := arrived.Load(); a != last {
				last, idle = a, time.Now()
			}
		}
	}
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				if i > 0 && i%100 == 0 {
					catchUp(int64(2 * i))
				}
				m := bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte(fmt.Sprintf("%d-%d", g, i))}
				if err := h.Deliver(ctx, m); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	delivered := make(chan struct{})
	go func() { wg.Wait(); close(delivered) }()
	// UDP may drop some of 2000 datagrams sent back to back: every one
	// that arrives is checked, and reading ends when all arrived or,
	// once every Deliver returned, when none came for a second.
	last, got := ans.seq, 0
	for got < 2*per {
		wait := 10 * time.Second
		select {
		case <-delivered:
			wait = time.Second
		default:
		}
		n, err := d.readObserved(wait)
		if err != nil {
			break
		}
		if n.seq < 0 {
			t.Fatalf("notification without Observe: %v", n)
		}
		if n.seq <= last {
			t.Fatalf("notification %d: Observe %d after %d", got, n.seq, last)
		}
		last = n.seq
		got++
		arrived.Store(int64(got))
	}
	<-delivered
	if got < per {
		t.Fatalf("only %d of %d notifications arrived", got, 2*per)
	}
	t.Logf("%d of %d notifications arrived, Observe numbers increasing", got, 2*per)
}

// A command larger than one notification (1024 bytes, the Block2 size of
// answers) is not notified: the hub hears the observer did not take it
// (Downlink: bridges.ErrNoReceiver), it is counted payload_too_large, and
// the next command that fits is notified whole. Before, the whole payload
// went out in one datagram, whatever its size. Mutation that fails it: the
// size check in session.notify removed (the 2000-byte command is notified
// and counted as received).
func TestObserveOversizeCommandRefused(t *testing.T) {
	h, dev, addr := startObserveServer(t, nil)
	d := dialRaw(t, dev, addr)
	d.sendObserve(1, "/c/x")
	if ans := d.nextObserved(); ans.typ != message.Acknowledgement || ans.seq < 0 {
		t.Fatalf("registration answer: %v", ans)
	}
	ctx := context.Background()
	big := bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte(strings.Repeat("b", 2000))}
	if err := h.Downlink(ctx, big); !errors.Is(err, bridges.ErrNoReceiver) {
		t.Fatalf("Downlink of 2000 bytes to a CoAP observer: %v, want ErrNoReceiver", err)
	}
	if got := testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonTooLarge)); got != 1 {
		t.Errorf("refusals payload_too_large = %v, want 1", got)
	}
	fits := bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte(strings.Repeat("f", 1024))}
	if err := h.Downlink(ctx, fits); err != nil {
		t.Fatalf("Downlink of 1024 bytes: %v", err)
	}
	if n := d.nextObserved(); n.typ != message.NonConfirmable || n.payload != string(fits.Payload) {
		t.Fatalf("next datagram: %v (%d bytes); want the 1024-byte command", n.typ, len(n.payload))
	}
}

// A session observes at most 16 tokens: a 17th registration is answered as
// a plain GET, without Observe (RFC 7641 §4.1: the device sees it is not
// registered), carrying the last command, counted observe_limit; a held
// token can register again. Without the bound a device could register
// tokens until the gateway ran out of memory.
func TestObserveRegistrationsBounded(t *testing.T) {
	h, dev, addr := startObserveServer(t, nil)
	if err := h.Deliver(context.Background(), bridges.Message{Device: "dev-psk", Topic: "devices/dev-psk/c/x", Payload: []byte("last")}); err != nil {
		t.Fatal(err)
	}
	d := dialRaw(t, dev, addr)
	for i := range 16 {
		d.sendObserve(uint16(100+i), "/c/x")
		if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq < 0 {
			t.Fatalf("registration %d: %v, want an ACK with Observe", i, a)
		}
	}
	d.sendObserve(200, "/c/x")
	a := d.nextObserved()
	if a.typ != message.Acknowledgement || a.seq >= 0 || a.payload != "last" {
		t.Fatalf("17th registration: %v, want an ACK without Observe carrying the last command", a)
	}
	if got := testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonObserveLimit)); got != 1 {
		t.Errorf("observe_limit refusals %v, want 1", got)
	}
	d.sendObserve(105, "/c/x") // a held token registers again
	if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq < 0 {
		t.Fatalf("held token registering again: %v, want an ACK with Observe", a)
	}
}

// offerOnly is a firmware cache that offers one version to every device
// and serves nothing else.
type offerOnly struct{}

func (offerOnly) ServeCoAP(w mux.ResponseWriter, _ *mux.Message, _ string) {
	_ = w.SetResponse(codes.NotFound, message.TextPlain, nil)
}
func (offerOnly) ServeCoAPStatus(w mux.ResponseWriter, _ *mux.Message, _ string) {
	_ = w.SetResponse(codes.Changed, message.TextPlain, nil)
}
func (offerOnly) Offer(device string) (otacache.Offer, bool) {
	return otacache.Offer{Device: device, Version: "2.0.0"}, true
}

// Registrations on /fw/offer count against the session's 16 like those on
// /c: with 10 on /c/x and 6 on /fw/offer, a 17th on /fw/offer is answered
// as a plain GET (the offer, no Observe), counted observe_limit, and the
// hub holds 16 observers. Before, /fw/offer registered without the check,
// so a device could register as many tokens as it liked there.
func TestOfferObserveRegistrationsBounded(t *testing.T) {
	h, dev, addr := startObserveServerWith(t, coap.Config{Firmware: offerOnly{}}, nil)
	d := dialRaw(t, dev, addr)
	for i := range 16 {
		path := "/c/x"
		if i >= 10 {
			path = "/fw/offer"
		}
		d.sendObserve(uint16(100+i), path)
		if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq < 0 {
			t.Fatalf("registration %d on %s: %v, want an ACK with Observe", i, path, a)
		}
	}
	d.sendObserve(200, "/fw/offer")
	a := d.nextObserved()
	if a.typ != message.Acknowledgement || a.seq >= 0 || !strings.Contains(a.payload, `"version":"2.0.0"`) {
		t.Fatalf("17th registration, on /fw/offer: %v, want an ACK without Observe carrying the offer", a)
	}
	if got := testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonObserveLimit)); got != 1 {
		t.Errorf("observe_limit refusals %v, want 1", got)
	}
	if got := testutil.ToFloat64(h.Metrics().Observers); got != 16 {
		t.Errorf("hub observers %v, want 16", got)
	}
	d.sendObserve(112, "/fw/offer") // a held token registers again
	if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq < 0 {
		t.Fatalf("held token registering again: %v, want an ACK with Observe", a)
	}
}

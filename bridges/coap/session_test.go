package coap_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

// fakeIdentity is a bridges.Identity with one PSK device ("dev-psk",
// identity "id-psk") and any certificate being device "dev-cert". It
// counts lookups, and after can revoke a device in the middle of one: the
// lookup's answer was read before the revocation, as a store read racing
// with a revocation would be.
type fakeIdentity struct {
	key []byte

	mu        sync.Mutex
	revoked   map[string]bool
	subs      []func(string)
	pskCalls  int
	certCalls int
	after     func(kind string, n int) // runs after lookup n of kind, before it returns
}

var errFakeRevoked = errors.New("revoked")

func (f *fakeIdentity) lookup(kind, dev string, calls *int) (int, error) {
	f.mu.Lock()
	*calls++
	n := *calls
	var err error
	if f.revoked[dev] {
		err = errFakeRevoked
	}
	after := f.after
	f.mu.Unlock()
	if after != nil {
		after(kind, n)
	}
	return n, err
}

func (f *fakeIdentity) VerifyCert([][]byte) (string, error) {
	_, err := f.lookup("cert", "dev-cert", &f.certCalls)
	return "dev-cert", err
}

func (f *fakeIdentity) PSK(identity []byte) (string, []byte, error) {
	if string(identity) != "id-psk" {
		// As the gateway's: it quotes the identity.
		return "", nil, fmt.Errorf("unknown PSK identity %q", identity)
	}
	if _, err := f.lookup("psk", "dev-psk", &f.pskCalls); err != nil {
		return "dev-psk", nil, err
	}
	return "dev-psk", f.key, nil
}

func (f *fakeIdentity) CheckSecret(string, []byte) error { return errors.New("no secrets") }

// CertValid: the fake's certificates never end (revoke closes its
// revoked devices' sessions); certsweep_test.go has an identity whose do.
func (f *fakeIdentity) CertValid(string, string, time.Time) error { return nil }

func (f *fakeIdentity) OnRevoke(fn func(string)) {
	f.mu.Lock()
	f.subs = append(f.subs, fn)
	f.mu.Unlock()
}

// revoke marks dev revoked, then tells the subscribers (as pki.Revocations
// does after the store has it).
func (f *fakeIdentity) revoke(dev string) {
	f.mu.Lock()
	f.revoked[dev] = true
	subs := append([]func(string){}, f.subs...)
	f.mu.Unlock()
	for _, fn := range subs {
		fn(dev)
	}
}

func (f *fakeIdentity) setAfter(fn func(kind string, n int)) {
	f.mu.Lock()
	f.after = fn
	f.mu.Unlock()
}

func (f *fakeIdentity) calls() (psk, cert int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pskCalls, f.certCalls
}

type nopSink struct{}

func (nopSink) Accept(context.Context, bridges.Message) error { return nil }

// startSessions runs a Server with both listeners on loopback and returns
// devices for its PSK and certificate listeners.
func startSessions(t *testing.T, id *fakeIdentity) (s *coap.Server, pskDev, certDev *devicesim.Device, pskAddr, certAddr string) {
	t.Helper()
	return startSessionsWithSink(t, id, nopSink{})
}

// startSessionsWithSink is startSessions with telemetry going to sink.
func startSessionsWithSink(t *testing.T, id *fakeIdentity, sink bridges.Sink) (s *coap.Server, pskDev, certDev *devicesim.Device, pskAddr, certAddr string) {
	t.Helper()
	s, pskDev, certDev, pskAddr, certAddr, _ = startStoppable(t, id, sink, 0)
	return s, pskDev, certDev, pskAddr, certAddr
}

// startStoppable is startSessionsWithSink with a confirmable request's
// wait for the Sink bounded by acceptTimeout (0: the server's default),
// and stop, which ends Run and returns once it has returned (bounded; also
// done at cleanup).
func startStoppable(t *testing.T, id *fakeIdentity, sink bridges.Sink, acceptTimeout time.Duration) (s *coap.Server, pskDev, certDev *devicesim.Device, pskAddr, certAddr string, stop func()) {
	t.Helper()
	return startWith(t, id, sink, coap.Config{}, nil, acceptTimeout)
}

// startWith is startStoppable with cfg (its listen addresses are set when
// empty) and log (nil: discarded).
func startWith(t *testing.T, id bridges.Identity, sink bridges.Sink, cfg coap.Config, log *slog.Logger, acceptTimeout time.Duration) (s *coap.Server, pskDev, certDev *devicesim.Device, pskAddr, certAddr string, stop func()) {
	t.Helper()
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.PSKListen == "" {
		cfg.PSKListen = "127.0.0.1:0"
	}
	key := []byte("0123456789abcdef")
	if f, ok := id.(*fakeIdentity); ok {
		key = f.key
	}
	dir := t.TempDir()
	ca, err := pki.Open(filepath.Join(dir, "pki"), "test", pki.SystemClock{}, log)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ca.ServerCert("coap", []string{"127.0.0.1"}, 24*time.Hour, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	h, err := hub.New(sink, prometheus.NewRegistry(), log)
	if err != nil {
		t.Fatal(err)
	}
	s, err = coap.New(cfg, sc, id, h, log)
	if err != nil {
		t.Fatal(err)
	}
	if acceptTimeout > 0 {
		coap.SetAcceptTimeout(s, acceptTimeout)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30 s of its context's end")
		}
	}
	t.Cleanup(stop)

	c, p := s.Addrs()
	pskDev = &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(key)}}
	leaf := testpki.New(t, dir, "maker").Client(t, "dev-cert")
	certDev = &devicesim.Device{Creds: devicesim.Creds{ID: "dev-cert", Auth: "cert", CertPEM: string(leaf.CertPEM), KeyPEM: string(leaf.KeyPEM)}}
	certDev.Roots = ca.RootPool()
	return s, pskDev, certDev, p.String(), c.String(), stop
}

// request opens a session and asks for /.well-known/core: an answer means
// onNewConn admitted the session (it runs before the first request is
// read); an error means the session was closed (when the server closes
// it right after its last handshake flight, the client may see that
// close_notify before its handshake is done).
func request(t *testing.T, d *devicesim.Device, addr string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialCoAP(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	r, err := c.Do(ctx, codes.GET, "/.well-known/core", nil, -1)
	if err == nil && r.Code != codes.Content {
		err = fmt.Errorf("GET /.well-known/core as %s: %v", d.ID, r.Code)
	}
	return err
}

// A PSK handshake looks the identity up once: onNewConn takes the device
// from the PSK callback's answer instead of asking the store again, also
// when several handshakes of one identity are in flight at once.
func TestPSKLookedUpOncePerSession(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, pskDev, _, pskAddr, _ := startSessions(t, id)
	const rounds, parallel = 3, 4
	for range rounds {
		errs := make(chan error, parallel)
		for range parallel {
			go func() { errs <- request(t, pskDev, pskAddr) }()
		}
		for range parallel {
			if err := <-errs; err != nil {
				t.Fatalf("session refused: %v", err)
			}
		}
	}
	if psk, _ := id.calls(); psk != rounds*parallel {
		t.Errorf("PSK lookups for %d sessions: %d, want %d", rounds*parallel, psk, rounds*parallel)
	}
}

// A device revoked after its PSK was accepted in the handshake, but before
// its session is registered, gets no session: the callback's answer is
// not trusted across a revocation.
func TestPSKRevokedDuringHandshake(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, pskDev, _, pskAddr, _ := startSessions(t, id)
	id.setAfter(func(kind string, n int) {
		if kind == "psk" && n == 1 {
			id.revoke("dev-psk")
		}
	})
	if err := request(t, pskDev, pskAddr); err == nil {
		t.Fatal("request answered on a session of a device revoked during its handshake")
	}
	if n := s.Sessions("dev-psk"); n != 0 {
		t.Errorf("sessions of the revoked device: %d, want 0", n)
	}
}

// A device revoked just after onNewConn checked it, before the session is
// registered (so the revocation finds nothing to close), gets no session:
// onNewConn checks again when a revocation came in between.
func TestCertRevokedWhileSessionRegisters(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, _, certDev, _, certAddr := startSessions(t, id)
	// Lookup 1 is the handshake's, 2 is onNewConn's.
	id.setAfter(func(kind string, n int) {
		if kind == "cert" && n == 2 {
			id.revoke("dev-cert")
		}
	})
	if err := request(t, certDev, certAddr); err == nil {
		t.Fatal("request answered on a session of a device revoked while its session was set up")
	}
	if n := s.Sessions("dev-cert"); n != 0 {
		t.Errorf("sessions of the revoked device: %d, want 0", n)
	}
}

// A device holds at most maxSessionsPerDevice (8) sessions also when many
// of its handshakes finish at once: each session past the bound closes all
// of the oldest beyond it, and they stop counting at once. Before, a new
// session closed only the oldest, which stayed counted until its close
// had gone through pion; handshakes finishing meanwhile closed that same
// one, and the device kept the rest. 48 handshakes of one PSK device, 16
// each from three loopback addresses (per-source limit raised so that
// none is refused), all at once.
func TestSessionsPerDeviceBoundedUnderParallelHandshakes(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, pskDev, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{MaxHandshakesPerSource: 64}, nil, 0)
	cfg, err := pskDev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const sources, perSource = 3, 16
	start := make(chan struct{})
	errs := make(chan error, sources*perSource)
	var mu sync.Mutex
	var conns []*piondtls.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	for src := 1; src <= sources; src++ {
		for range perSource {
			go func() {
				pc, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.%d:0", src))
				if err != nil {
					errs <- err
					return
				}
				c, err := piondtls.Client(pc, raddr, cfg)
				if err != nil {
					pc.Close()
					errs <- err
					return
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
				<-start
				errs <- c.HandshakeContext(ctx)
			}()
		}
	}
	close(start)
	for range sources * perSource {
		// A handshake may fail when the server closes its session right
		// after its last flight (a later session pushed it out); what
		// matters is what the server holds.
		<-errs
	}
	// Settle: every session closed so far has run its OnClose (the
	// server's session count matches the device's list), and stays so.
	deadline := time.Now().Add(10 * time.Second)
	stable := 0
	for stable < 20 {
		if time.Now().After(deadline) {
			t.Fatalf("sessions never settled: %d open in all, %d listed for the device", s.SessionCount(), s.Sessions("dev-psk"))
		}
		if s.SessionCount() == s.Sessions("dev-psk") {
			stable++
		} else {
			stable = 0
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.Sessions("dev-psk"); n > 8 {
		t.Fatalf("the device holds %d sessions after %d parallel handshakes, want at most 8", n, sources*perSource)
	}
	if n := s.SessionCount(); n > 8 {
		t.Fatalf("%d sessions open after %d parallel handshakes of one device, want at most 8", n, sources*perSource)
	}
}

package coap_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

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
		return "", nil, errors.New("unknown PSK identity")
	}
	if _, err := f.lookup("psk", "dev-psk", &f.pskCalls); err != nil {
		return "dev-psk", nil, err
	}
	return "dev-psk", f.key, nil
}

func (f *fakeIdentity) CheckSecret(string, []byte) error { return errors.New("no secrets") }

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
	h, err := hub.New(sink, prometheus.NewRegistry(), log)
	if err != nil {
		t.Fatal(err)
	}
	s, err = coap.New(coap.Config{Listen: "127.0.0.1:0", PSKListen: "127.0.0.1:0"}, sc, id, h, log)
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
	pskDev = &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
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

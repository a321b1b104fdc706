package gateway

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/crypto/argon2"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/pki"
)

// secretIdentity is an identity over a fresh store holding one secret-login
// device "plug" (secret "right secret"), whose argon2id runs are counted.
func secretIdentity(t *testing.T, slots int, wait time.Duration) (*identity, *atomic.Int32, *atomic.Int32) {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.AddDevice(store.Device{ID: "plug", Name: "plug", Auth: "secret",
		SecretHash: HashSecret([]byte("right secret"), []byte("0123456789abcdef"))}); err != nil {
		t.Fatal(err)
	}
	var inFlight, most atomic.Int32
	sc := newSecretChecker(slots, wait)
	sc.idKey = func(password, salt []byte, tm, m uint32, p uint8, n uint32) []byte {
		now := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			old := most.Load()
			if now <= old || most.CompareAndSwap(old, now) {
				break
			}
		}
		return argon2.IDKey(password, salt, tm, m, p, n)
	}
	return &identity{store: st, m: newMetrics(func() float64 { return 0 }), secrets: sc, log: discard}, &inFlight, &most
}

// Many concurrent wrong-password logins never run more argon2id checks at
// once than the bound, and every one of them returns; a right secret still
// passes afterwards.
func TestSecretChecksBounded(t *testing.T) {
	id, inFlight, most := secretIdentity(t, 2, 20*time.Second)
	before := runtime.NumGoroutine()
	const n = 12
	errs := make([]error, n)
	var wg sync.WaitGroup
	for k := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev := "plug"
			if k%3 == 0 {
				dev = fmt.Sprintf("nosuch%d", k) // unknown ids take a slot too (dummy hash)
			}
			errs[k] = id.CheckSecret(dev, []byte("wrong secret"))
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("secret checks did not all return within 60s")
	}
	for k, err := range errs {
		if err == nil || errors.Is(err, ErrSecretCheckBusy) {
			t.Errorf("check %d = %v, want refused as wrong or unknown (the wait was long enough)", k, err)
		}
	}
	if got := most.Load(); got > 2 || got < 1 {
		t.Errorf("argon2id runs in flight at most %d, want 1 to 2", got)
	}
	if got := testutil.ToFloat64(id.m.authFailures.WithLabelValues("secret")); got != n {
		t.Errorf("secret failures counted %v, want %d", got, n)
	}
	if err := id.CheckSecret("plug", []byte("right secret")); err != nil {
		t.Errorf("right secret refused: %v", err)
	}
	if inFlight.Load() != 0 || len(id.secrets.slots) != 0 {
		t.Errorf("%d runs in flight, %d slots held after every check returned", inFlight.Load(), len(id.secrets.slots))
	}
	waitFor(t, "goroutines of the checks to end", func() bool { return runtime.NumGoroutine() <= before })
}

// A login that finds no free slot within the wait is refused as busy,
// distinguishably from a wrong secret, in the error and the metric.
func TestSecretCheckBusy(t *testing.T) {
	id, _, _ := secretIdentity(t, 1, 50*time.Millisecond)
	id.secrets.slots <- struct{}{} // the only slot is taken
	err := id.CheckSecret("plug", []byte("right secret"))
	if !errors.Is(err, ErrSecretCheckBusy) || !strings.Contains(err.Error(), "plug") {
		t.Errorf("with no slot free: %v, want ErrSecretCheckBusy naming the device", err)
	}
	if got := testutil.ToFloat64(id.m.authFailures.WithLabelValues("secret_busy")); got != 1 {
		t.Errorf("secret_busy counted %v, want 1", got)
	}
	<-id.secrets.slots
	if err := id.CheckSecret("plug", []byte("right secret")); err != nil {
		t.Errorf("right secret refused once a slot is free: %v", err)
	}
}

// Secrets longer than MaxSecretLen are refused before any hashing; revoked
// devices are refused as revoked.
func TestSecretCheckRefusals(t *testing.T) {
	id, _, most := secretIdentity(t, 2, time.Second)
	long := []byte(strings.Repeat("x", MaxSecretLen+1))
	if err := id.CheckSecret("plug", long); err == nil || !strings.Contains(err.Error(), "limit") {
		t.Errorf("%d-byte secret: %v, want refused for its length", len(long), err)
	}
	if most.Load() != 0 {
		t.Error("an over-long secret was hashed")
	}
	if _, err := id.store.Revoke("plug", time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := id.CheckSecret("plug", []byte("right secret")); !errors.Is(err, pki.ErrRevoked) {
		t.Errorf("revoked device: %v, want ErrRevoked", err)
	}
}

// An id without secret login costs an argon2id run like a wrong secret, so
// the answer's timing does not say which ids exist.
func TestSecretUnknownIDHashed(t *testing.T) {
	id, _, most := secretIdentity(t, 2, time.Second)
	if err := id.CheckSecret("nosuch", []byte("a secret")); err == nil {
		t.Fatal("unknown id accepted")
	}
	if most.Load() != 1 {
		t.Error("an unknown id was refused without the dummy argon2id run")
	}
}

// The console's password hashing takes the device secret checks' slots
// (consoleBackend's Argon2Slots): while it holds both, a device check is
// refused busy, and while device checks hold both, the console waits.
func TestConsoleSharesSecretCheckSlots(t *testing.T) {
	id, _, _ := secretIdentity(t, 2, 10*time.Millisecond)
	b := consoleBackend{&Gateway{secrets: id.secrets}}
	for range 2 {
		if err := b.AcquireArgon2(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if err := id.CheckSecret("plug", []byte("right secret")); !errors.Is(err, ErrSecretCheckBusy) {
		t.Errorf("device check while the console holds both slots: %v, want ErrSecretCheckBusy", err)
	}
	b.ReleaseArgon2()
	b.ReleaseArgon2()
	if err := id.CheckSecret("plug", []byte("right secret")); err != nil {
		t.Errorf("device check once the console gave its slots back: %v", err)
	}
	id.secrets.slots <- struct{}{}
	id.secrets.slots <- struct{}{}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.AcquireArgon2(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("console's slot while device checks hold both: %v, want to wait until its context ends", err)
	}
}

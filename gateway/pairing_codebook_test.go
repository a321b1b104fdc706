package gateway

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// The expected devices in the store (what the admin controls) decide at
// every hello which setup code a device may use; the code book's records,
// derived at earlier hellos, must never outlive what the store says.

// windowTimesOut lets the open window run out on the fake clock.
func (g *pgw) windowTimesOut(t *testing.T) {
	t.Helper()
	select {
	case <-g.pclock.Armed():
	case <-time.After(5 * time.Second):
		t.Fatal("the window armed no timeout")
	}
	g.pclock.Advance(pairing.DefaultDuration + time.Second)
	if r := g.lastClose(t); r != pairing.ReasonTimeout {
		t.Fatalf("window closed for %q, want timeout", r)
	}
}

// helloOnly says hello as id in a window that then times out, as a device
// that went no further would: the gateway derives the code for id at this
// hello.
func (g *pgw) helloOnly(ctx context.Context, t *testing.T, id string) {
	t.Helper()
	g.press(t, 1500*time.Millisecond)
	s, err := devicesim.DialPSK(ctx, g.g.Addrs()["coaps_psk"], pairing.PAKEIdentityPrefix+id, pairing.PublicPAKEPSK(id))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	hello, _ := (pairing.PAKEMessage{Type: pairing.MsgHello, ID: []byte(id)}).MarshalBinary()
	if r, err := s.Do(ctx, codes.POST, coap.PAKEPath, hello, int(message.AppOctets)); err != nil || r.Code != codes.Changed {
		t.Fatalf("hello of %s = %v %v, want 2.04", id, r.Code, err)
	}
	if !g.inBook(id) {
		t.Fatalf("the hello of %s registered no code for it", id)
	}
	g.windowTimesOut(t)
}

func (g *pgw) inBook(id string) bool {
	for _, c := range g.g.pairing.codes.List() {
		if c.Device == id {
			return true
		}
	}
	return false
}

// refusedAtHello checks that id, with code, cannot enroll in a new window
// and that the hello is what failed (one failed attempt), the code book
// holding nothing for id afterwards.
func (g *pgw) refusedAtHello(ctx context.Context, t *testing.T, id, code string) {
	t.Helper()
	g.press(t, 1500*time.Millisecond)
	devices, _ := g.g.Devices().List()
	missing := len(g.audited(t, "pairing.setup_code_missing"))
	if c, err := devicesim.PairCode(ctx, g.g.Addrs()["coaps_psk"], id, code, devicesim.PairOptions{}); err == nil {
		t.Fatalf("%s enrolled (as %s) with a setup code the store no longer holds", id, c.ID)
	}
	if st := g.g.pairing.win.State(); !st.Open || st.Failures != 1 {
		t.Errorf("after the hello: window open %v, failures %d; want open with 1", st.Open, st.Failures)
	}
	if n := len(g.audited(t, "pairing.setup_code_missing")); n != missing+1 {
		t.Errorf("%d setup_code_missing events for the hello, want 1", n-missing)
	}
	if g.inBook(id) {
		t.Errorf("the code book still holds a code for %s", id)
	}
	if after, _ := g.g.Devices().List(); len(after) != len(devices) {
		t.Errorf("devices = %d after the refused hello, want %d", len(after), len(devices))
	}
}

func TestPairingWithdrawnCodeRefused(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	g.helloOnly(ctx, t, "acme-t1")

	// The admin withdraws the code (console: g.g.Store() is what it calls).
	es, err := g.g.Store().ExpectedDevices()
	if err != nil || len(es) != 1 {
		t.Fatalf("expected devices = %v %v, want thermo", es, err)
	}
	if err := g.g.Store().DeleteExpectedDevice(es[0].ID); err != nil {
		t.Fatal(err)
	}
	g.refusedAtHello(ctx, t, "acme-t1", goodCode)
}

func TestPairingSpentCodeRefusedUnderAnotherID(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// One code expected: any label id may use it, so an earlier hello
	// from acme-x registered it under acme-x too.
	g.expect(t, "thermo", goodCode)
	g.helloOnly(ctx, t, "acme-x")

	g.press(t, 1500*time.Millisecond)
	if _, err := devicesim.PairCode(ctx, g.g.Addrs()["coaps_psk"], "acme-t1", goodCode, devicesim.PairOptions{}); err != nil {
		t.Fatalf("pair with the setup code: %v", err)
	}
	// Spent: no copy of it is left in the book, whatever its id.
	if g.inBook("acme-x") {
		t.Error("the spent code is still in the code book under acme-x")
	}
	g.refusedAtHello(ctx, t, "acme-x", goodCode)
}

func TestPairingSeveralUnnamedRefusedDespiteOldRecord(t *testing.T) {
	g := startPairing(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	g.expect(t, "thermo", goodCode)
	g.helloOnly(ctx, t, "acme-t1")

	// Two expected, neither named acme-t1: which code is meant is unknown.
	g.expect(t, "lamp", "WXYZ-9876-QRST")
	g.refusedAtHello(ctx, t, "acme-t1", goodCode)
	if n := len(g.audited(t, "pairing.setup_code_missing")); n != 1 {
		t.Errorf("%d setup_code_missing events, want 1", n)
	}
}

// The store decides at the hello; a code withdrawn during the exchange,
// after round 2, does not enroll either.
func TestPairingCodeWithdrawnDuringExchange(t *testing.T) {
	g := startPairing(t, nil)
	p := g.g.pairing
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const id = "acme-t1"
	g.expect(t, "thermo", goodCode)
	g.press(t, 1500*time.Millisecond)

	secret, err := pairing.DeriveSetupSecret([]byte(goodCode), id, spake2plus.DefaultKDFParams)
	if err != nil {
		t.Fatal(err)
	}
	dev := &pairing.Device{ID: id, Role: pairing.GatewayProver, Verifier: secret.VerifierRecord(), Rand: rand.Reader}
	hello, err := dev.Hello()
	if err != nil {
		t.Fatal(err)
	}
	r1, err := p.PAKE(ctx, idPAKE+id, hello)
	if err != nil {
		t.Fatalf("hello: %v", err)
	}
	round2, err := dev.Round1(r1)
	if err != nil {
		t.Fatal(err)
	}
	done, err := p.PAKE(ctx, idPAKE+id, round2)
	if err != nil {
		t.Fatalf("round 2: %v", err)
	}
	if _, _, _, err := dev.Done(done); err != nil {
		t.Fatalf("the gateway did not prove the code: %v", err)
	}

	es, err := g.g.Store().ExpectedDevices()
	if err != nil || len(es) != 1 {
		t.Fatalf("expected devices = %v %v, want thermo", es, err)
	}
	if err := g.g.Store().DeleteExpectedDevice(es[0].ID); err != nil {
		t.Fatal(err)
	}
	if _, err := p.EnrollPSK(ctx, idEnroll+id); err == nil {
		t.Fatal("enrolled with a setup code withdrawn during the exchange")
	}
	if ds, _ := g.g.Devices().List(); len(ds) != 0 {
		t.Errorf("devices = %v, want none", ds)
	}
	if st := p.win.State(); !st.Open || st.Failures != 1 {
		t.Errorf("window open %v, failures %d; want open with 1", st.Open, st.Failures)
	}
}

package gateway

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// expectedNames is the names of the devices the store expects.
func expectedNames(t *testing.T, st *store.Store) []string {
	t.Helper()
	es, err := st.ExpectedDevices()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name)
	}
	return out
}

// An expired setup code, which is the label's secret in clear, is deleted
// from the store with no one opening the console's pairing page: at the
// next hello's lookup, every sweepEvery, and at start. It used to stay in
// bastion.db until someone viewed that page.
func TestExpiredSetupCodeDeletedWithoutPageView(t *testing.T) {
	t.Run("at the hello's lookup", func(t *testing.T) {
		g := startPairing(t, nil) // the sweep a minute away
		clk := g.g.opts.Clock.(*testpki.OffsetClock)
		g.expect(t, "lamp", goodCode)
		clk.Add(time.Hour + time.Minute)
		if _, err := g.g.pairing.expectedFor("acme-l1"); !errors.Is(err, pairing.ErrNoCode) {
			t.Errorf("lookup of an expired code: %v, want no code", err)
		}
		if got := expectedNames(t, g.g.Store()); len(got) != 0 {
			t.Errorf("expected devices after the lookup %v, want none", got)
		}
	})

	t.Run("swept", func(t *testing.T) {
		g := startPairingWith(t, nil, func(g *Gateway) { g.pairing.sweepEvery = 5 * time.Millisecond })
		clk := g.g.opts.Clock.(*testpki.OffsetClock)
		g.expect(t, "lamp", goodCode)
		g.expect(t, "plug", "ZZZZ-YYYY-XXXX")
		now := time.Now().Add(2 * time.Hour)
		if _, err := g.g.Store().ExpectDevice(store.ExpectedDevice{Name: "later", Code: "WWWW-VVVV-UUUU", Created: now, Expires: now.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		clk.Add(time.Hour + time.Minute)
		for i := 0; ; i++ {
			got := expectedNames(t, g.g.Store())
			if len(got) == 1 && got[0] == "later" {
				break
			}
			if i == 500 {
				t.Fatalf("expected devices %v an hour past two codes' end, want later only", got)
			}
			time.Sleep(10 * time.Millisecond)
		}
		g.waitLog(t, "expired setup code deleted", "name=lamp")
	})

	t.Run("at start", func(t *testing.T) {
		g := startPairing(t, nil)
		g.expect(t, "lamp", goodCode)
		g.running.stop(t)
		g.running.done <- nil // for the cleanup's stop
		clk := &testpki.OffsetClock{}
		clk.Set(time.Hour + time.Minute)
		r := runGateway(t, Options{Dev: true, StateDir: g.dir, Log: discard, Out: &bytes.Buffer{}, Clock: clk}, 10*time.Second)
		defer r.stop(t)
		if got := expectedNames(t, r.g.Store()); len(got) != 0 {
			t.Errorf("expected devices after a restart past the code's end %v, want none", got)
		}
	})
}

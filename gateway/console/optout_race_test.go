package console

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/store"
)

// Two opt-out changes at once are made one after the other, from saving
// to handing the set to the gateway, so that the set the gateway applies
// last is the one stored. Each used to save, read the set back and hand it
// over on its own: a change that read the set first could hand it over
// after the other, and the gateway kept or dropped data as the store no
// longer said. Here the first change hands over its set only once the
// second has gone as far as it can (synctest.Wait: finished, or waiting
// for the first).
func TestOptOutChangesAtOnceApplyTheStoredSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		h, err := NewHandler(Options{Store: st, Gateway: stubGateway{}})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		p := &principal{user: "root", role: RoleAdmin, remote: "10.0.0.5"}
		var mu sync.Mutex
		var applied []map[string]bool
		var started bool
		second := make(chan error, 1)
		h.SetComponents(Components{OptOutsChanged: func(m map[string]bool) {
			mu.Lock()
			first := !started
			started = true
			mu.Unlock()
			if first {
				go func() { second <- h.setOptOut(ctx, p, optOutInput{Datum: "device.counters", OptOut: false}) }()
				synctest.Wait()
			}
			mu.Lock()
			applied = append(applied, m)
			mu.Unlock()
		}})
		if err := h.setOptOut(ctx, p, optOutInput{Datum: "device.counters", OptOut: true}); err != nil {
			t.Fatal(err)
		}
		if err := <-second; err != nil {
			t.Fatal(err)
		}
		stored, err := st.OptOuts()
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(applied) != 2 {
			t.Fatalf("the gateway was handed %v, want two sets", applied)
		}
		if d := cmp.Diff(stored, applied[1]); d != "" {
			t.Errorf("the set handed over last, against the one stored (-stored +applied):\n%s", d)
		}
	})
}

// A change waiting for another gives up when its request ends, saving
// nothing.
func TestOptOutChangeWaitingGivesUpWithItsRequest(t *testing.T) {
	h, _, _ := newTestHandler(t)
	h.optOutLock <- struct{}{} // a change under way
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := h.setOptOut(ctx, &principal{user: "root", role: RoleAdmin}, optOutInput{Datum: "device.counters", OptOut: true})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("change with its request ended: %v, want context.Canceled", err)
	}
	if m, err := h.o.Store.OptOuts(); err != nil || len(m) != 0 {
		t.Errorf("stored %v, %v; want nothing saved", m, err)
	}
}

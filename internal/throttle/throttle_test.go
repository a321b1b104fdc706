package throttle

import (
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestBackoffDoubles(t *testing.T) {
	th := New(Policy{Base: 10 * time.Second, Max: 80 * time.Second, Forget: time.Hour}, 100)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var got []time.Duration
	for range 7 {
		th.Fail(now, "u:root", 3)
		th.Fail(now, "s:10.0.0.2", 100)
		if until := th.LockedUntil(now, "u:root"); until.IsZero() {
			got = append(got, 0)
		} else {
			got = append(got, until.Sub(now))
		}
	}
	want := []time.Duration{0, 0, 10 * time.Second, 20 * time.Second, 40 * time.Second, 80 * time.Second, 80 * time.Second}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("lockout after each failure (-want +got):\n%s", d)
	}
	if !th.LockedUntil(now.Add(81*time.Second), "u:root").IsZero() {
		t.Error("still locked after the lockout ended")
	}
	if !th.LockedUntil(now, "s:10.0.0.2").IsZero() {
		t.Error("key locked after 7 failures with free 100")
	}
	if th.LockedUntil(now, "s:10.0.0.2", "u:root").IsZero() {
		t.Error("LockedUntil of several keys ignores a locked one")
	}
	th.Reset("u:root")
	if !th.LockedUntil(now, "u:root").IsZero() {
		t.Error("locked after Reset")
	}
	// Forgotten after Forget without failures: counting starts over.
	th.Fail(now, "x", 2)
	th.Fail(now.Add(2*time.Hour), "x", 2)
	if !th.LockedUntil(now.Add(2*time.Hour), "x").IsZero() {
		t.Error("a failure older than Forget still counted")
	}
}

func TestBounded(t *testing.T) {
	th := New(Policy{Base: time.Second, Max: time.Minute, Forget: time.Hour}, 10)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	th.Fail(now, "old", 1)
	for i := range 50 {
		th.Fail(now.Add(time.Duration(i+1)*time.Second), fmt.Sprintf("k%d", i), 5)
	}
	if n := th.Len(); n != 10 {
		t.Errorf("throttle holds %d keys, bound 10", n)
	}
	if !th.LockedUntil(now, "old").IsZero() {
		t.Error("the oldest key was not the one evicted")
	}
}

package throttle

import (
	"fmt"
	"maps"
	"slices"
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

// Past the bound, keys of one failure each (made-up names) push out each
// other, the oldest first: never a locked key, nor one with more failures.
func TestBoundedKeepsLockedKeys(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 10)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for range 5 {
		th.Fail(now, "u:admin", 5)
	}
	for range 3 {
		th.Fail(now, "many", 100)
	}
	for i := range 50 {
		th.Fail(now.Add(time.Duration(i+1)*time.Second), fmt.Sprintf("k%d", i), 5)
	}
	if n := th.Len(); n != 10 {
		t.Errorf("throttle holds %d keys, bound 10", n)
	}
	end := now.Add(time.Minute)
	if got := th.LockedUntil(now.Add(50*time.Second), "u:admin"); !got.Equal(end) {
		t.Errorf("u:admin locked until %v, want %v: a locked key was evicted", got, end)
	}
	var got []string
	for k, e := range th.m {
		got = append(got, fmt.Sprintf("%s=%d", k, e.fails))
	}
	want := []string{"k42=1", "k43=1", "k44=1", "k45=1", "k46=1", "k47=1", "k48=1", "k49=1", "many=3", "u:admin=5"}
	slices.Sort(got)
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("keys held (-want +got):\n%s", d)
	}
}

// A key whose last failure is older than Forget counts nothing: it goes
// before one that still counts, whatever its failures.
func TestBoundedEvictsForgottenFirst(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 2)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for range 3 {
		th.Fail(now, "old", 100)
	}
	later := now.Add(2 * time.Hour)
	th.Fail(later, "one", 100)
	th.Fail(later, "new", 100)
	if _, ok := th.m["one"]; !ok || th.Len() != 2 {
		t.Errorf("held %v, want one and new (old forgotten)", slices.Sorted(maps.Keys(th.m)))
	}
}

// Full of locked keys, the Throttle adds none, and a key it does not hold
// counts as locked until the first lockout ends; then it has room again.
func TestFullOfLockedKeys(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 3)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	th.Fail(t0, "a", 1)
	th.Fail(t0.Add(10*time.Second), "b", 1)
	th.Fail(t0.Add(10*time.Second), "c", 1)
	now := t0.Add(20 * time.Second)
	if got, want := th.LockedUntil(now, "new"), t0.Add(time.Minute); !got.Equal(want) {
		t.Errorf("a key not held, while full of locked keys: locked until %v, want %v", got, want)
	}
	th.Fail(now, "new", 5)
	if _, ok := th.m["new"]; ok || th.Len() != 3 {
		t.Errorf("held %v after a failure of a new key, want a b c", slices.Sorted(maps.Keys(th.m)))
	}
	now = t0.Add(61 * time.Second)
	if got := th.LockedUntil(now, "new"); !got.IsZero() {
		t.Errorf("a key not held once a lockout ended: locked until %v", got)
	}
	th.Fail(now, "new", 5)
	if got, want := slices.Sorted(maps.Keys(th.m)), []string{"b", "c", "new"}; !slices.Equal(got, want) {
		t.Errorf("held %v, want %v (a's lockout ended: a goes)", got, want)
	}
}

// FailHeld counts only for a key held: it extends a lockout, adds no key.
func TestFailHeld(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 10)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	th.FailHeld(now, "new", 1)
	if th.Len() != 0 {
		t.Errorf("FailHeld of a key not held added it")
	}
	th.Fail(now, "held", 2)
	th.FailHeld(now, "held", 2)
	if got, want := th.LockedUntil(now, "held"), now.Add(time.Minute); !got.Equal(want) {
		t.Errorf("held key locked until %v after Fail and FailHeld with free 2, want %v", got, want)
	}
	th.FailHeld(now.Add(2*time.Hour), "held", 2)
	if !th.LockedUntil(now.Add(2*time.Hour), "held").IsZero() {
		t.Error("FailHeld counted a key forgotten after Forget")
	}
}

// Unlock lifts a lockout and keeps the failures: the next failure locks
// again, for the time all of them count for; a key not held stays so.
func TestUnlockKeepsFailures(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 10)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for range 3 {
		th.Fail(now, "s", 3)
	}
	th.Unlock("s")
	if got := th.LockedUntil(now, "s"); !got.IsZero() {
		t.Errorf("locked until %v after Unlock", got)
	}
	th.Fail(now, "s", 3)
	if got, want := th.LockedUntil(now, "s"), now.Add(2*time.Minute); !got.Equal(want) {
		t.Errorf("after Unlock and one more failure: locked until %v, want %v (the fourth failure's lockout)", got, want)
	}
	th.Unlock("none")
	if th.Len() != 1 {
		t.Errorf("Unlock of a key not held added it: %d keys", th.Len())
	}
}

// Failed: a key with a failure within Forget, locked or not; not one never
// failed, forgotten, or Reset.
func TestFailed(t *testing.T) {
	th := New(Policy{Base: time.Minute, Max: time.Hour, Forget: time.Hour}, 10)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if th.Failed(now, "s:a") {
		t.Error("a key never failed is Failed")
	}
	th.Fail(now, "s:a", 5)
	if !th.Failed(now, "s:a") || !th.LockedUntil(now, "s:a").IsZero() {
		t.Error("one failure of five free: want Failed and not locked")
	}
	if th.Failed(now.Add(time.Hour+time.Second), "s:a") {
		t.Error("a failure older than Forget still Failed")
	}
	th.Reset("s:a")
	if th.Failed(now, "s:a") {
		t.Error("Failed after Reset")
	}
}

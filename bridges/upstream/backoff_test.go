package upstream

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBackoff(time.Second, time.Minute)
	b.now = func() time.Time { return now }
	b.jitter = func(n int64) int64 { return n - 1 } // the top of the range
	if d := b.delay(0); d != 0 {
		t.Errorf("first connection waits %v, want 0", d)
	}
	// Failed attempts double, up to max.
	for attempt, want := range map[int]time.Duration{1: 2 * time.Second, 2: 4 * time.Second, 5: 32 * time.Second, 6: time.Minute, 40: time.Minute} {
		if d := b.delay(attempt); d != want {
			t.Errorf("attempt %d waits %v, want %v", attempt, d, want)
		}
	}
	// A connection that stayed up: the reconnect waits min (jittered),
	// never 0, which autopaho's own backoff would.
	b.up()
	now = now.Add(stableAfter)
	b.down()
	if d := b.delay(0); d != time.Second {
		t.Errorf("after a stable connection: %v, want 1s", d)
	}
	// Connections dropped right after they came up count as failures.
	for i, want := range []time.Duration{2 * time.Second, 4 * time.Second, 8 * time.Second} {
		b.up()
		now = now.Add(time.Second)
		b.down()
		if d := b.delay(0); d != want {
			t.Errorf("after %d short connections: %v, want %v", i+1, d, want)
		}
	}
	b.up()
	now = now.Add(stableAfter)
	b.down()
	if d := b.delay(0); d != time.Second {
		t.Errorf("a stable connection resets: %v, want 1s", d)
	}
	// The jitter keeps at least half the delay.
	b.jitter = func(int64) int64 { return 0 }
	if d := b.delay(3); d != 4*time.Second {
		t.Errorf("the bottom of the jitter for 8s: %v, want 4s", d)
	}
}

func TestParkBucket(t *testing.T) {
	now := time.Unix(1000, 0)
	var b parkBucket
	for i := range parkBurst {
		if !b.take(now) {
			t.Fatalf("take %d refused within the burst", i)
		}
	}
	if b.take(now) {
		t.Fatal("take past the burst allowed")
	}
	now = now.Add(parkEvery)
	if !b.take(now) || b.take(now) {
		t.Fatal("want one take per parkEvery after the burst")
	}
	b.refill()
	if !b.take(now) {
		t.Fatal("a success must refill the bucket")
	}
}

package clock

import (
	"testing"
	"time"
)

func TestFakeFiresOnlyDueTimers(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	f := NewFake(start)
	a, b := f.After(time.Second), f.After(time.Minute)
	<-f.Armed()
	<-f.Armed()
	f.Advance(999 * time.Millisecond)
	select {
	case <-a:
		t.Fatal("timer fired early")
	default:
	}
	f.Advance(time.Millisecond)
	if got := <-a; !got.Equal(start.Add(time.Second)) {
		t.Fatalf("fired with %v", got)
	}
	select {
	case <-b:
		t.Fatal("minute timer fired after a second")
	default:
	}
	if f.Waiters() != 1 {
		t.Fatalf("waiters = %d, want 1", f.Waiters())
	}
	if got := <-f.After(0); !got.Equal(f.Now()) {
		t.Fatalf("zero timer fired with %v", got)
	}
}

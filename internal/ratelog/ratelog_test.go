package ratelog

import (
	"strconv"
	"testing"
	"time"
)

// Every lets one line per kind per interval through and reports how
// many of the kind it held back.
func TestLogEvery(t *testing.T) {
	l := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	if n, ok := l.Allow("a", t0); !ok || n != 0 {
		t.Fatalf("first event: %d, %v", n, ok)
	}
	for i := range 5 {
		if _, ok := l.Allow("a", t0.Add(time.Duration(i)*time.Second)); ok {
			t.Fatalf("event %d within the interval let through", i)
		}
	}
	if _, ok := l.Allow("b", t0); !ok {
		t.Fatal("another kind held back by the first")
	}
	if n, ok := l.Allow("a", t0.Add(10*time.Second)); !ok || n != 5 {
		t.Fatalf("after the interval: %d not logged, %v; want 5, true", n, ok)
	}
}

// An Every keyed by device forgets the kinds with nothing left to
// report once it holds MaxKinds, and keeps those with a count of lines
// not logged, so that the next line still reports it.
func TestLogEveryForgetsSettledKinds(t *testing.T) {
	l := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	for i := range MaxKinds {
		l.Allow("k"+strconv.Itoa(i), t0)
	}
	l.Allow("k0", t0.Add(time.Second)) // not logged: counted for k0
	later := t0.Add(11 * time.Second)
	if _, ok := l.Allow("new", later); !ok {
		t.Fatal("a new kind was not logged")
	}
	if len(l.last) != 2 {
		t.Fatalf("%d kinds held after the interval, want 2 (k0, with a line not logged, and new)", len(l.last))
	}
	if n, ok := l.Allow("k0", later); !ok || n != 1 {
		t.Fatalf("k0 after the interval: logged %v, not logged before %d; want true, 1", ok, n)
	}
}

package hub

import (
	"testing"
	"time"
)

const acceptTimeout = 5 * time.Second

func TestSharedDeadline(t *testing.T) {
	a := &SharedDeadline{Timeout: acceptTimeout}
	defer a.Stop()
	t0 := time.Now()
	c1 := a.Context(t0)
	if c2 := a.Context(t0.Add(999 * time.Millisecond)); c2 != c1 {
		t.Error("publishes within the same second got different contexts; want one shared")
	}
	c3 := a.Context(t0.Add(time.Second))
	if c3 == c1 {
		t.Error("a publish one second later reused the old context; its wait would be bounded by less than acceptTimeout")
	}
	// Every publish may wait at least acceptTimeout and at most 1 s more.
	for _, start := range []time.Time{t0, t0.Add(999 * time.Millisecond)} {
		dl, ok := c1.Deadline()
		if !ok || dl.Sub(start) < acceptTimeout || dl.Sub(start) > acceptTimeout+time.Second {
			t.Errorf("publish at +%v: deadline +%v (set %v); want between %v and %v after it",
				start.Sub(t0), dl.Sub(start), ok, acceptTimeout, acceptTimeout+time.Second)
		}
	}
	if _, ok := a.ForQoS(0, t0).Deadline(); ok {
		t.Error("a QoS 0 message got a deadline; its Accept does not wait")
	}
	if a.ForQoS(1, t0.Add(time.Second)) != c3 {
		t.Error("a QoS 1 message did not get the shared context")
	}
	a.Stop()
	if c3.Err() == nil {
		t.Error("stop did not release the current context")
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

func goid() string {
	b := make([]byte, 64)
	b = b[:runtime.Stack(b, false)]
	if f := strings.Fields(string(b)); len(f) > 1 {
		return f[1]
	}

	return ""
}

// TestSpareGoroutines (Bastion patch (20)): functions run one after
// another run on the goroutine that ran the first; two at once on two;
// once the listener is done, a spare goroutine ends.
func TestSpareGoroutines(t *testing.T) {
	done := make(chan struct{})
	s := newSpareGoroutines(done)
	ran := make(chan string)
	run := func() { ran <- goid() }
	wait := func() string {
		t.Helper()
		select {
		case g := <-ran:
			return g
		case <-time.After(10 * time.Second):
			t.Fatal("function not run within 10 s")
		}

		return ""
	}
	s.run(run)
	first := wait()
	// The goroutine is back waiting a few instructions after run returns;
	// a scheduler slow in between may make one more.
	var same int
	for range 10 {
		for sent := false; !sent; {
			select {
			case s.work <- run:
				sent = true
			case <-time.After(10 * time.Second):
				t.Fatal("no spare goroutine waiting within 10 s")
			}
		}
		if wait() == first {
			same++
		}
	}
	if same != 10 {
		t.Errorf("%d of 10 functions ran on the first goroutine, want 10", same)
	}
	// Two at once: the waiting one takes the first, a new one the second.
	block := make(chan struct{})
	started := make(chan string, 2)
	f := func() { started <- goid(); <-block }
	s.run(f)
	s.run(f)
	a, b := <-started, <-started
	if a == b {
		t.Errorf("two blocking functions ran on one goroutine %s", a)
	}
	close(done)
	close(block)
	// Both end once their function has returned (the listener is done):
	// nothing takes work any more.
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := 0
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		n = strings.Count(string(buf), "(*spareGoroutines).loop")
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d spare goroutines still running 10 s after the listener was closed", n)
		}
		runtime.Gosched()
	}
}

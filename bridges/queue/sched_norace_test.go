//go:build !race

// The race detector randomizes which runnable goroutine runs next, the
// very order this test is about, so it builds only without -race;
// scripts/test.d/scheduling.sh runs it (go test -race ./... does not).

package queue

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCommitTakesReadiedWriters: writers made runnable together (as the
// device sessions one network poll readies) share one commit, even though
// the first one's message wakes the writer ahead of the others. With one
// P and an fsync that holds it (a spin, as a raw fsync does), a writer
// that committed at once carried one message and left the rest behind its
// fsync: without the yield, 20 writers took 20 commits in two thirds of
// the rounds and 2–3 in the rest; with it, one commit in 98 % of them.
func TestCommitTakesReadiedWriters(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	const writers, rounds = 20, 10
	var fsyncs, durable atomic.Int32
	q, _ := open(t, t.TempDir(), Options{Sync: func(f *os.File) error {
		fsyncs.Add(1)
		for end := time.Now().Add(2 * time.Millisecond); time.Now().Before(end); {
		}
		return f.Sync()
	}})
	for r := range rounds {
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range writers {
			wg.Go(func() {
				<-start
				m := msg(fmt.Sprint("d", i), r*writers+i)
				if _, err := q.AcceptNotify(context.Background(), m, func(error) { durable.Add(1) }); err != nil {
					t.Error(err)
				}
			})
		}
		runtime.Gosched() // let them all wait on start
		close(start)
		wg.Wait()
		want := int32((r + 1) * writers)
		for deadline := time.Now().Add(10 * time.Second); durable.Load() < want && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		if d := durable.Load(); d != want {
			t.Fatalf("round %d: %d of %d messages durable", r, d, want)
		}
	}
	// One commit per round is the aim; a round of two now and then is the
	// scheduler's (its global queue is looked at every 61st turn).
	if n := fsyncs.Load(); n > rounds*3/2 {
		t.Errorf("%d rounds of %d writers readied together took %d fsyncs; want about one per round", rounds, writers, n)
	}
}

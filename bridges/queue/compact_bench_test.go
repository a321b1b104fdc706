package queue

import (
	"context"
	"testing"
)

// BenchmarkCompactNotDue: what flush's look for a compaction costs, at
// every commit and delivered-marks flush (under the lock flush holds
// anyway), when none is due: with the queue's segments below half of
// MaxBytes (the usual case: one comparison after summing the segments),
// and above it with every message held (the whole plan, which finds
// nothing worth copying). The commit's own cost is an fsync, tens of
// microseconds at least.
//
//	go test -run '^$' -bench CompactNotDue ./bridges/queue/
func BenchmarkCompactNotDue(b *testing.B) {
	for _, c := range []struct {
		name string
		fill int64 // bytes of held messages accepted first
	}{{"below-half", 20 << 10}, {"above-half-all-held", 40 << 10}} {
		b.Run(c.name, func(b *testing.B) {
			q, err := Open(b.TempDir(), Options{MaxBytes: 64 << 10, SegmentBytes: 4 << 10}, nil, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			for i := 0; q.Stats().Bytes < c.fill; i++ {
				if err := q.Accept(context.Background(), msg("d", i)); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			q.mu.Lock()
			for range b.N {
				if q.compactPlanLocked() != nil {
					b.Fatal("a compaction is due")
				}
			}
			q.mu.Unlock()
			b.StopTimer()
			b.ReportMetric(float64(segCount(q)), "segments")
		})
	}
}

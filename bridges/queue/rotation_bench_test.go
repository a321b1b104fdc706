package queue

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
)

// BenchmarkRotation: what starting a new segment costs the devices whose
// messages are being committed then. 8 writers, 400-byte messages, the
// default 4 MiB segments, three rotations; each Accept's latency (admission
// to durable). With the next segment prepared ahead the rotation is a
// rename; without (noSpare, every rotation before session 13) the commit
// that needs the new segment first writes its 4 MiB of zeros and syncs
// them.
//
//	go test -run '^$' -bench Rotation -benchtime 1x -count 3 ./bridges/queue/
func BenchmarkRotation(b *testing.B) {
	const writers, payload, segs = 8, 400, 5
	for range b.N {
		for _, mode := range []struct {
			name    string
			noSpare bool
		}{{"spare", false}, {"no-spare", true}} {
			q, err := Open(b.TempDir(), Options{noSpare: mode.noSpare}, nil, nil)
			if err != nil {
				b.Fatal(err)
			}
			each := int(segs*q.opts.SegmentBytes/(payload+40)) / writers
			lat := make([][]time.Duration, writers)
			var wg sync.WaitGroup
			start := time.Now()
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					m := bridges.Message{Device: fmt.Sprintf("d%d", w), Topic: "t", Payload: make([]byte, payload), QoS: 1}
					for range each {
						m.Received = time.Now()
						if err := q.Accept(context.Background(), m); err != nil {
							b.Error(err)
							return
						}
						lat[w] = append(lat[w], time.Since(m.Received))
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			q.mu.Lock()
			rotations := len(q.segs) - 1
			q.mu.Unlock()
			q.Close()
			all := slices.Concat(lat...)
			slices.Sort(all)
			pct := func(p float64) time.Duration { return all[min(len(all)-1, int(float64(len(all))*p))] }
			b.Logf("%-8s %d messages in %v, %d rotations: Accept p50 %v p99 %v p99.9 %v max %v", mode.name, len(all),
				elapsed.Round(time.Millisecond), rotations, pct(0.5).Round(time.Microsecond), pct(0.99).Round(time.Microsecond),
				pct(0.999).Round(time.Microsecond), all[len(all)-1].Round(time.Microsecond))
			b.ReportMetric(float64(all[len(all)-1].Microseconds()), "max-µs-"+mode.name)
			b.ReportMetric(float64(pct(0.999).Microseconds()), "p99.9-µs-"+mode.name)
		}
	}
}

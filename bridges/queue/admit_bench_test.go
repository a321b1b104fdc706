package queue

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
)

// BenchmarkAdmitAck: what a message costs the queue's CPU on its way
// through, without the disk's wait: admission (AcceptNotify), the writer's
// write and indexing (the fsync is a no-op), NextInto and Ack, in rounds
// of 64 messages from 1, 1,000, 3,000 or 10,000 devices (each device's count is looked
// up at admission and released at Ack: see share.go). ns/op is per
// message, wall clock, the writer goroutine's work included; cpu-ns/op
// the process's CPU time per message.
//
//	go test -run '^$' -bench AdmitAck -count 5 ./bridges/queue/
func BenchmarkAdmitAck(b *testing.B) {
	for _, devices := range []int{1, 1000, 3000, 10000} {
		b.Run(fmt.Sprintf("devices=%d", devices), func(b *testing.B) {
			q, err := Open(b.TempDir(), Options{Sync: func(*os.File) error { return nil }, AckFlushInterval: time.Hour}, nil, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			ms := make([]bridges.Message, devices)
			for i := range ms {
				id := fmt.Sprintf("device-%04d", i)
				ms[i] = bridges.Message{Device: id, Topic: "devices/" + id + "/t/temp", QoS: 1, Payload: make([]byte, 100), Received: time.Now()}
			}
			ctx := context.Background()
			const batch = 64
			var reported sync.WaitGroup
			report := func(err error) {
				if err != nil {
					b.Error(err)
				}
				reported.Done()
			}
			seqs := make([]uint64, 0, batch)
			var es []Entry
			var buf []byte
			var after uint64
			next := 0
			b.ReportAllocs()
			b.ResetTimer()
			cpu0 := cpuTime(b)
			for done := 0; done < b.N; done += batch {
				for range batch {
					reported.Add(1)
					if _, err := q.AcceptNotify(ctx, ms[next], report); err != nil {
						b.Fatal(err)
					}
					next = (next + 1) % devices
				}
				reported.Wait()
				seqs = seqs[:0]
				for len(seqs) < batch {
					es, buf, err = q.NextInto(ctx, after, batch, es, buf)
					if err != nil {
						b.Fatal(err)
					}
					for _, e := range es {
						seqs = append(seqs, e.Seq)
						after = e.Seq
					}
				}
				if err := q.Ack(seqs...); err != nil {
					b.Fatal(err)
				}
			}
			// The process's CPU time per message: less at the mercy of a
			// loaded box than ns/op, which counts the waits for a CPU.
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
		})
	}
}

// cpuTime is the process's user and system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

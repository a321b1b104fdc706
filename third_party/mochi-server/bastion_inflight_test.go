package mqtt

import (
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestBastionNextImmediateWithWriters (Bastion patch (20)): NextImmediate
// took the inflight read lock twice (through GetAll); a writer (a publish
// to the client, a PUBACK) that came between the two made the second wait
// for it while it waited for the first, and the client's reader hung.
// Writers and NextImmediate run side by side here, bounded in count and
// time, as in TestBastionGetByListenerWithWriters.
func TestBastionNextImmediateWithWriters(t *testing.T) {
	in := NewInflights()
	for id := uint16(1); id <= 8; id++ {
		in.Set(packets.Packet{PacketID: id, Expiry: -1})
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(id uint16) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				in.Set(packets.Packet{PacketID: id, Expiry: -1})
				in.Delete(id)
			}
		}(uint16(100 + w))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200000; i++ {
			if _, ok := in.NextImmediate(); !ok {
				t.Error("NextImmediate found none of the packets waiting")
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("NextImmediate deadlocked with the writers")
	}
	close(stop)
	wg.Wait()
}

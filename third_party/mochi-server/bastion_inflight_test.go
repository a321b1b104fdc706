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

// TestBastionSendImmediateKeepsMessage (Bastion patch (19)): the message
// sent once the client's receive quota frees up stays in flight, with the
// expiry publishToSubscribers gave it (-1 while it waited), and the next
// one waiting is the one after it. Upstream deleted it once written.
func TestBastionSendImmediateKeepsMessage(t *testing.T) {
	s := newServer()
	s.Options.Capabilities.MaximumMessageExpiryInterval = 3600
	in := NewInflights()
	in.Set(packets.Packet{PacketID: 1, Created: 1000, Expiry: -1, Properties: packets.Properties{MessageExpiryInterval: 30}})
	in.Set(packets.Packet{PacketID: 2, Created: 1000, Expiry: -1})

	pk, ok := in.sendImmediate(s.messageExpiry)
	if !ok || pk.PacketID != 1 || pk.Expiry != 1030 {
		t.Fatalf("sent id %d expiry %d (%v), want id 1 expiry 1030", pk.PacketID, pk.Expiry, ok)
	}
	if kept, ok := in.Get(1); !ok || kept.Expiry != 1030 {
		t.Fatalf("in flight after it was sent: %v, expiry %d; want kept with expiry 1030", ok, kept.Expiry)
	}
	if next, ok := in.NextImmediate(); !ok || next.PacketID != 2 {
		t.Fatalf("next waiting: id %d (%v), want 2", next.PacketID, ok)
	}
	if pk, _ := in.sendImmediate(s.messageExpiry); pk.Expiry != 4600 {
		t.Fatalf("expiry of a message without its own: %d, want the server's maximum (4600)", pk.Expiry)
	}
	if _, ok := in.sendImmediate(s.messageExpiry); ok {
		t.Fatal("sendImmediate found a message waiting after both were sent")
	}
}

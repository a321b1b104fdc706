package mqtt

import (
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
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
	in.Set(packets.Packet{PacketID: 1, Expiry: -1}) // one: little to sort, many calls
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
	case <-time.After(60 * time.Second): // about 2 s, 3 s under -race
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
	const maximumExpiry = 3600
	in := NewInflights()
	in.Set(packets.Packet{PacketID: 1, Created: 1000, Expiry: -1, Properties: packets.Properties{MessageExpiryInterval: 30}})
	in.Set(packets.Packet{PacketID: 2, Created: 1000, Expiry: -1})

	pk, ok := in.sendImmediate(maximumExpiry)
	if !ok || pk.PacketID != 1 || pk.Expiry != 1030 {
		t.Fatalf("sent id %d expiry %d (%v), want id 1 expiry 1030", pk.PacketID, pk.Expiry, ok)
	}
	if kept, ok := in.Get(1); !ok || kept.Expiry != 1030 {
		t.Fatalf("in flight after it was sent: %v, expiry %d; want kept with expiry 1030", ok, kept.Expiry)
	}
	if next, ok := in.NextImmediate(); !ok || next.PacketID != 2 {
		t.Fatalf("next waiting: id %d (%v), want 2", next.PacketID, ok)
	}
	if pk, _ := in.sendImmediate(maximumExpiry); pk.Expiry != 4600 {
		t.Fatalf("expiry of a message without its own: %d, want the server's maximum (4600)", pk.Expiry)
	}
	if _, ok := in.sendImmediate(maximumExpiry); ok {
		t.Fatal("sendImmediate found a message waiting after both were sent")
	}
}

// TestBastionResendWithinReceiveMaximum (Bastion patch (22)): a resumed
// session of a client whose Receive Maximum allows two is sent two of its
// three held PUBLISHes, in order: one sent before (DUP), then one that had
// waited for quota (not DUP, now sent); the third waits for quota, marked
// DUP for when it goes. Upstream wrote all three and left the one that had
// waited marked waiting, to be sent again at the next PUBACK.
func TestBastionResendWithinReceiveMaximum(t *testing.T) {
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetSendQuota(2)
	pub := func(id uint16, created, expiry int64) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id,
			TopicName: "a/b", Payload: []byte{byte(id)}, Created: created, Expiry: expiry}
	}
	cl.State.Inflight.Set(pub(1, 1000, 0))
	cl.State.Inflight.Set(pub(2, 1001, -1))
	cl.State.Inflight.Set(pub(3, 1002, 0))

	got := make(chan []byte)
	go func() {
		buf, _ := io.ReadAll(r)
		got <- buf
	}()
	if err := cl.ResendInflightMessages(true); err != nil {
		t.Fatal(err)
	}
	_ = w.Close()
	buf := <-got

	var sent []string
	for len(buf) > 0 {
		pk := packets.Packet{ProtocolVersion: 5}
		if err := pk.FixedHeader.Decode(buf[0]); err != nil {
			t.Fatal(err)
		}
		n := int(buf[1]) // these packets are short: a one-byte length
		pk.FixedHeader.Remaining = n
		if err := pk.PublishDecode(buf[2 : 2+n]); err != nil {
			t.Fatal(err)
		}
		sent = append(sent, fmt.Sprintf("%d dup=%v", pk.PacketID, pk.FixedHeader.Dup))
		buf = buf[2+n:]
	}
	if want := []string{"1 dup=true", "2 dup=false"}; !slices.Equal(sent, want) {
		t.Errorf("written %v, want %v", sent, want)
	}
	if q := atomic.LoadInt32(&cl.State.Inflight.sendQuota); q != 0 {
		t.Errorf("send quota %d after the resend, want 0", q)
	}
	if pk, _ := cl.State.Inflight.Get(2); pk.Expiry < 0 {
		t.Error("the message sent after waiting for quota is still marked waiting")
	}
	next, ok := cl.State.Inflight.NextImmediate()
	if !ok || next.PacketID != 3 || !next.FixedHeader.Dup {
		t.Errorf("waiting: id %d dup %v (%v), want 3, DUP", next.PacketID, next.FixedHeader.Dup, ok)
	}
}

package mqtt

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestLongFiltersRefused: a subscription filter is held to the length of a
// topic path (256 bytes below devices/{id}/c/ or bastion/broadcast/), as
// topics are. Each level of a filter is a node of the broker's topic tree,
// built under its one lock and kept an hour after the session: a 4 KiB
// filter of 2000 levels, in the device's own tree or in the broadcast
// tree (where the read check let any string through), is refused like a
// filter outside the namespace (SUBACK 0x87, 3.1.1 0x80) and counted;
// 256 bytes are still granted.
func TestLongFiltersRefused(t *testing.T) {
	for _, tc := range []struct {
		ver     byte
		refused byte
	}{{5, packets.ErrNotAuthorized.Code}, {4, packets.ErrUnspecifiedError.Code}} {
		t.Run(fmt.Sprintf("v%d", tc.ver), func(t *testing.T) {
			r := newRig(t, queue.Options{})
			d := r.dial(t, "deep", tc.ver)
			deep := strings.Repeat("a/", 2000) + "a"
			fits := strings.Repeat("b/", 127) + "bb" // 256 bytes
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
				Filters: packets.Subscriptions{
					{Filter: "devices/deep/c/" + deep},
					{Filter: hub.BroadcastPrefix + deep},
					{Filter: "devices/deep/c/" + deep + "/#"},
					{Filter: "devices/deep/c/" + fits},
					{Filter: hub.BroadcastPrefix + fits},
				}}
			d.send(pk)
			ack := d.read(5 * time.Second)
			if ack.FixedHeader.Type != packets.Suback {
				t.Fatalf("got packet type %d, want SUBACK", ack.FixedHeader.Type)
			}
			want := []byte{tc.refused, tc.refused, tc.refused, 0, 0}
			if string(ack.ReasonCodes) != string(want) {
				t.Fatalf("SUBACK codes %x, want %x", ack.ReasonCodes, want)
			}
			if got := r.refusals(hub.ReasonSubscribeACL); got != 3 {
				t.Errorf("subscribe_outside_namespace refusals %v, want 3", got)
			}
			cl, _ := r.s.mq.Clients.Get("deep")
			if n := cl.State.Subscriptions.Len(); n != 2 {
				t.Errorf("the session holds %d subscriptions, want 2", n)
			}
		})
	}
}

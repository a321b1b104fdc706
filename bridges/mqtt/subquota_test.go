package mqtt

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestSubscriptionQuota: a device holds at most MaxSubscriptions
// subscriptions (each stays in the broker's topic tree, also an hour after
// its session ends): one SUBSCRIBE of 33 filters in its namespace gets 32
// granted and 0x97 quota exceeded (3.1.1: 0x80) for the last, counted and
// logged; subscribing again to a held filter is still granted.
func TestSubscriptionQuota(t *testing.T) {
	for _, tc := range []struct {
		ver  byte
		over byte
	}{{5, packets.ErrQuotaExceeded.Code}, {4, packets.ErrUnspecifiedError.Code}} {
		t.Run(fmt.Sprintf("v%d", tc.ver), func(t *testing.T) {
			r := newRigWith(t, queue.Options{}, Config{}, nil)
			d := r.dial(t, "subs", tc.ver)
			subscribe := func(id uint16, filters ...string) []byte {
				t.Helper()
				pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id}
				for _, f := range filters {
					pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: 1})
				}
				d.send(pk)
				for {
					ack := d.read(5 * time.Second)
					if ack.FixedHeader.Type == packets.Suback {
						return ack.ReasonCodes
					}
				}
			}
			filters := []string{"devices/subs/c/#"}
			for i := range 32 {
				filters = append(filters, fmt.Sprintf("devices/subs/c/%d", i))
			}
			codes := subscribe(1, filters...)
			if len(codes) != 33 {
				t.Fatalf("SUBACK has %d codes, want 33", len(codes))
			}
			for i, c := range codes[:32] {
				if c != 1 {
					t.Fatalf("filter %d: 0x%02x, want granted QoS 1", i, c)
				}
			}
			if codes[32] != tc.over {
				t.Fatalf("33rd filter: 0x%02x, want 0x%02x", codes[32], tc.over)
			}
			if got := subscribe(2, "devices/subs/c/5"); len(got) != 1 || got[0] != 1 {
				t.Fatalf("resubscribing to a held filter: %v, want granted", got)
			}
			// A command delivered to the device at its quota is no refusal
			// (mochi checks read access per delivery, with the topic).
			if err := r.hub.Deliver(context.Background(), bridges.Message{Device: "subs", Topic: "devices/subs/c/led", Payload: []byte("on"), QoS: 1}); err != nil {
				t.Fatal(err)
			}
			for pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Publish; pk = d.read(5 * time.Second) {
			}
			if got := r.refusals(hub.ReasonSubscriptionsLimit); got != 1 {
				t.Errorf("subscriptions_limit refusals %v, want 1", got)
			}
		})
	}
}

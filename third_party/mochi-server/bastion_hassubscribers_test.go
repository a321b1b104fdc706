package mqtt

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// TestBastionHasSubscribers: HasSubscribers is true whenever Subscribers
// finds anyone, over filters with wildcards, shared and inline
// subscriptions and $ topics.
func TestBastionHasSubscribers(t *testing.T) {
	topics := []string{"a", "a/b", "a/b/c", "a/x/c", "devices/d1/t/temp", "devices/d2/c/fw/offer", "$SYS/x", "$other/a/b", "z"}
	filters := []string{"a/b", "a/+", "a/#", "#", "+/b/#", "devices/d1/#", "devices/+/c/#", "$SYS/#", "+/a/b", "$other/+/b"}
	for _, f := range filters {
		for _, kind := range []string{"client", "shared", "inline"} {
			x := NewTopicsIndex()
			switch kind {
			case "client":
				x.Subscribe("cl1", packets.Subscription{Filter: f})
			case "shared":
				x.Subscribe("cl1", packets.Subscription{Filter: "$share/g/" + f})
			case "inline":
				x.InlineSubscribe(InlineSubscription{Subscription: packets.Subscription{Filter: f, Identifier: 1}, Handler: func(*Client, packets.Subscription, packets.Packet) {}})
			}
			for _, tp := range topics {
				s := x.Subscribers(tp)
				found := len(s.Subscriptions)+len(s.Shared)+len(s.InlineSubscriptions) > 0
				if found && !x.HasSubscribers(tp) {
					t.Errorf("%s subscription %q: Subscribers(%q) finds one, HasSubscribers says none", kind, f, tp)
				}
			}
		}
	}
	if NewTopicsIndex().HasSubscribers("a/b") {
		t.Error("an empty index has subscribers")
	}
	x := NewTopicsIndex()
	x.Subscribe("cl1", packets.Subscription{Filter: "devices/d1/#"})
	if x.HasSubscribers("devices/d2/t/temp") {
		t.Error("devices/d1/# matches devices/d2/t/temp")
	}
}

package mqtt

import (
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

func TestSubscribedHookReportsGrantedAndResumedFilters(t *testing.T) {
	var got []string
	h := &subscribedHook{fn: func(device, filter string) { got = append(got, device+" "+filter) }}
	cl := &mochi.Client{ID: "d1"}
	cl.State.Subscriptions = mochi.NewSubscriptions()

	// A SUBSCRIBE: only the filters the broker granted are reported.
	pk := packets.Packet{Filters: packets.Subscriptions{{Filter: "devices/d1/c/fw/offer"}, {Filter: "devices/d2/c/#"}, {Filter: "devices/d1/c/#", Qos: 1}}}
	h.OnSubscribed(cl, pk, []byte{0x00, packets.ErrNotAuthorized.Code, 0x01})
	if d := cmp.Diff([]string{"d1 devices/d1/c/fw/offer", "d1 devices/d1/c/#"}, got); d != "" {
		t.Errorf("SUBSCRIBE (-want +got):\n%s", d)
	}

	// A session kept from before: every filter it holds, at reconnect.
	got = nil
	cl.State.Subscriptions.Add("devices/d1/c/fw/offer", packets.Subscription{Filter: "devices/d1/c/fw/offer"})
	cl.State.Subscriptions.Add("bastion/broadcast/#", packets.Subscription{Filter: "bastion/broadcast/#"})
	h.OnSessionEstablished(cl, packets.Packet{})
	slices.Sort(got)
	if d := cmp.Diff([]string{"d1 bastion/broadcast/#", "d1 devices/d1/c/fw/offer"}, got); d != "" {
		t.Errorf("resumed session (-want +got):\n%s", d)
	}

	// The gateway's own inline client is not a device.
	got = nil
	inline := &mochi.Client{ID: "inline"}
	inline.Net.Inline = true
	inline.State.Subscriptions = mochi.NewSubscriptions()
	inline.State.Subscriptions.Add("devices/+/t/#", packets.Subscription{Filter: "devices/+/t/#"})
	h.OnSubscribed(inline, packets.Packet{Filters: packets.Subscriptions{{Filter: "devices/+/t/#"}}}, []byte{0})
	h.OnSessionEstablished(inline, packets.Packet{})
	if len(got) != 0 {
		t.Errorf("inline client reported: %q", got)
	}
}

package mqtt

import (
	"bytes"
	"fmt"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// OnSubscribed registers fn to learn each topic filter a device holds once
// it is in force: every filter granted by a SUBSCRIBE, and, when a device
// reconnects to a session kept from before (clean session off), every
// filter that session already holds. The gateway uses it to send a device
// that subscribes late what it would otherwise have missed (the current
// firmware offer), computed at that moment. That is not done with retained
// messages because mochi drops a retained message MaximumMessageExpiryInterval
// (the session expiry, 1 h) after it was published, and a withdrawn offer
// would linger until someone cleared it.
//
// fn runs on the device's session goroutine and must not block; device is
// the authenticated device id (the MQTT client id), filter is inside the
// device's own namespace or the broadcast tree (the ACL granted it).
func (s *Server) OnSubscribed(fn func(device, filter string)) error {
	if err := s.mq.AddHook(&subscribedHook{fn: fn}, nil); err != nil {
		return fmt.Errorf("mqtt: add the subscription hook: %w", err)
	}
	return nil
}

type subscribedHook struct {
	mochi.HookBase
	fn func(device, filter string)
}

func (h *subscribedHook) ID() string { return "bastion-subscribed" }

func (h *subscribedHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnSubscribed, mochi.OnSessionEstablished}, []byte{b})
}

func (h *subscribedHook) OnSubscribed(cl *mochi.Client, pk packets.Packet, reasonCodes []byte) {
	if cl.Net.Inline {
		return
	}
	for i, sub := range pk.Filters {
		if i < len(reasonCodes) && reasonCodes[i] < packets.ErrUnspecifiedError.Code {
			h.fn(cl.ID, sub.Filter)
		}
	}
}

func (h *subscribedHook) OnSessionEstablished(cl *mochi.Client, _ packets.Packet) {
	if cl.Net.Inline {
		return
	}
	for filter := range cl.State.Subscriptions.GetAll() {
		h.fn(cl.ID, filter)
	}
}

package mqtt

import (
	"encoding/json"
	"log/slog"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

// RetainedStore keeps retained messages across restarts (the gateway's
// bbolt store implements it). Values are opaque to the store.
type RetainedStore interface {
	PutRetained(topic string, value []byte) error
	DeleteRetained(topic string) error
	ForEachRetained(fn func(topic string, value []byte) error) error
}

// retainHook persists the broker's retained messages in a RetainedStore.
type retainHook struct {
	mochi.HookBase
	st  RetainedStore
	log *slog.Logger
}

func (h *retainHook) ID() string { return "bastion-retained" }

func (h *retainHook) Provides(b byte) bool {
	return retainEvents[b]
}

func (h *retainHook) OnRetainMessage(cl *mochi.Client, pk packets.Packet, r int64) {
	if r == -1 {
		if err := h.st.DeleteRetained(pk.TopicName); err != nil {
			h.log.Error("mqtt: retained message not deleted from the store", "device", cl.ID, "topic", pk.TopicName, "err", err)
		}
		return
	}
	m := storage.Message{
		ID: pk.TopicName, T: storage.RetainedKey, FixedHeader: pk.FixedHeader, TopicName: pk.TopicName,
		Payload: pk.Payload, Origin: pk.Origin, Created: pk.Created,
		Properties: storage.MessageProperties{ContentType: pk.Properties.ContentType,
			PayloadFormat: pk.Properties.PayloadFormat, PayloadFormatFlag: pk.Properties.PayloadFormatFlag,
			MessageExpiryInterval: pk.Properties.MessageExpiryInterval, User: pk.Properties.User},
	}
	b, err := json.Marshal(m)
	if err == nil {
		err = h.st.PutRetained(pk.TopicName, b)
	}
	if err != nil {
		h.log.Error("mqtt: retained message not stored", "device", cl.ID, "topic", pk.TopicName, "err", err)
	}
}

func (h *retainHook) OnRetainedExpired(topic string) {
	if err := h.st.DeleteRetained(topic); err != nil {
		h.log.Error("mqtt: expired retained message not deleted", "topic", topic, "err", err)
	}
}

func (h *retainHook) StoredRetainedMessages() ([]storage.Message, error) {
	var out []storage.Message
	err := h.st.ForEachRetained(func(topic string, v []byte) error {
		var m storage.Message
		if err := json.Unmarshal(v, &m); err != nil {
			h.log.Warn("mqtt: unreadable retained message skipped", "topic", topic, "err", err)
			return nil
		}
		out = append(out, m)
		return nil
	})
	return out, err
}

var retainEvents = hookEvents(mochi.OnRetainMessage, mochi.OnRetainedExpired, mochi.StoredRetainedMessages)

// hookEvents is a lookup table for a hook's Provides: mochi asks every hook
// for every event of every packet (about ten times a PUBLISH), so the answer
// must cost no more than an index.
func hookEvents(events ...byte) *[256]bool {
	var t [256]bool
	for _, e := range events {
		t[e] = true
	}
	return &t
}

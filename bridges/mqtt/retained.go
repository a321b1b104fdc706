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
	// DeleteRetained removes the messages of topics, in one write.
	DeleteRetained(topics ...string) error
	// DeleteRetainedUnder removes the messages whose topic starts with
	// prefix, in one write, and returns how many it removed.
	DeleteRetainedUnder(prefix string) (int, error)
	ForEachRetained(fn func(topic string, value []byte) error) error
}

// retainHook persists the broker's retained messages in a RetainedStore.
type retainHook struct {
	mochi.HookBase
	st  RetainedStore
	log *slog.Logger
	s   *Server // its KeepRetained; nil in tests of the store alone
}

func (h *retainHook) ID() string { return "bastion-retained" }

func (h *retainHook) Provides(b byte) bool {
	return retainEvents[b]
}

// OnRetainMessage mirrors what mochi's TopicsIndex.RetainMessage did with
// pk, r being its answer: 1, a message now retained on the topic (stored);
// -1, one cleared (deleted); 0, an empty retained message on a topic that
// held none, which changed nothing, so nothing is written. Stored, such a
// message was a synced write per publish of a record mochi never held (so
// never expired, never counted against MaxRetained), and a device could
// fill the disk with new topics at the rate of its fsyncs.
func (h *retainHook) OnRetainMessage(cl *mochi.Client, pk packets.Packet, r int64) {
	if r == -1 {
		if err := h.st.DeleteRetained(pk.TopicName); err != nil {
			h.log.Error("mqtt: retained message not deleted from the store", "device", cl.ID, "topic", pk.TopicName, "err", err)
		}
		return
	}
	if r != 1 {
		return
	}
	if h.s != nil && !h.s.keepRetained(pk.TopicName, len(pk.Payload)) {
		// OnPublish found it kept, but KeepRetained changed since (an
		// opt-out switched on, whose DropRetainedNotKept may have run
		// before the broker retained it): neither stored nor kept.
		h.s.clearRetained(pk.TopicName)
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

// StoredRetainedMessages reads the stored retained messages for mochi to
// load at start. A record with an empty payload is no retained message
// (mochi would only clear the topic with it): it is deleted, in one write
// after the scan, not loaded. Earlier versions stored one for every empty
// retained publish on a topic that held none (OnRetainMessage).
func (h *retainHook) StoredRetainedMessages() ([]storage.Message, error) {
	var out []storage.Message
	var empty []string
	err := h.st.ForEachRetained(func(topic string, v []byte) error {
		var m storage.Message
		if err := json.Unmarshal(v, &m); err != nil {
			h.log.Warn("mqtt: unreadable retained message skipped", "topic", topic, "err", err)
			return nil
		}
		if len(m.Payload) == 0 {
			empty = append(empty, topic)
			return nil
		}
		if h.s != nil && !h.s.keepRetained(topic, len(m.Payload)) {
			// Not deleted here: KeepRetained may refuse it because the
			// opt-outs are unreadable, which erases nothing
			// (DropRetainedNotKept deletes on an opt-out).
			return nil
		}
		out = append(out, m)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(empty) > 0 {
		// Not fatal: they are skipped again at the next start.
		if err := h.st.DeleteRetained(empty...); err != nil {
			h.log.Error("mqtt: empty retained records not deleted from the store", "records", len(empty), "err", err)
		} else {
			h.log.Info("mqtt: empty retained records deleted from the store (stored by an earlier version)", "records", len(empty))
		}
	}
	return out, nil
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

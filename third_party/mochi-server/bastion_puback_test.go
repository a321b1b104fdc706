package mqtt

import (
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// qosRecorder records the QoS hooks in the order they run.
type qosRecorder struct {
	HookBase
	mu     sync.Mutex
	events []string
}

func (h *qosRecorder) ID() string { return "qos-recorder" }
func (h *qosRecorder) Provides(b byte) bool {
	return b == OnQosPublish || b == OnQosComplete
}
func (h *qosRecorder) OnQosPublish(cl *Client, pk packets.Packet, sent int64, resends int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "publish")
}
func (h *qosRecorder) OnQosComplete(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "complete")
}

// TestInboundQos1PubackBookkeeping (Bastion patch): the PUBACK of an inbound
// QoS 1 message is kept in Inflight only when it could not be written, as
// before the patch (where it was set before the write and deleted after);
// the hooks see OnQosPublish then OnQosComplete for a written PUBACK, and
// only OnQosPublish for one that could not be written.
func TestInboundQos1PubackBookkeeping(t *testing.T) {
	pk := *packets.TPacketData[packets.Publish].Get(packets.TPublishQos1).Packet

	t.Run("written", func(t *testing.T) {
		s := newServer()
		rec := new(qosRecorder)
		require.NoError(t, s.AddHook(rec, nil))
		cl, r, w := newTestClient()
		s.Clients.Add(cl)
		got := make(chan []byte)
		go func() {
			buf, _ := io.ReadAll(r)
			got <- buf
		}()
		require.NoError(t, s.processPublish(cl, pk))
		_ = w.Close()
		require.Equal(t, []byte{packets.Puback << 4, 2, 0, byte(pk.PacketID)}, <-got)
		require.Equal(t, 0, cl.State.Inflight.Len())
		require.Equal(t, int64(0), atomic.LoadInt64(&s.Info.Inflight))
		require.Equal(t, int32(10), atomic.LoadInt32(&cl.State.Inflight.receiveQuota))
		require.Equal(t, []string{"publish", "complete"}, rec.events)
	})

	t.Run("write failed", func(t *testing.T) {
		s := newServer()
		rec := new(qosRecorder)
		require.NoError(t, s.AddHook(rec, nil))
		cl, _, w := newTestClient()
		s.Clients.Add(cl)
		_ = w.Close()
		require.ErrorIs(t, s.processPublish(cl, pk), io.ErrClosedPipe)
		ack, ok := cl.State.Inflight.Get(pk.PacketID)
		require.True(t, ok, "the unsent PUBACK is kept for the session to resend")
		require.Equal(t, packets.Puback, ack.FixedHeader.Type)
		require.Equal(t, int64(1), atomic.LoadInt64(&s.Info.Inflight))
		require.Equal(t, int32(9), atomic.LoadInt32(&cl.State.Inflight.receiveQuota))
		require.Equal(t, []string{"publish"}, rec.events)
	})
}

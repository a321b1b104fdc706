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
	return b == OnQosPublish || b == OnQosComplete || b == OnQosDropped
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
func (h *qosRecorder) OnQosDropped(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "dropped")
}

// TestInboundQos1PubackBookkeeping (Bastion patch): the PUBACK of an inbound
// QoS 1 message is never kept in Inflight: not when written (as before the
// patch, where it was set before the write and deleted after), and not when
// the write failed (before the patch it stayed, and a later connection
// inheriting the session wrote it without the message having been stored);
// the hooks see OnQosPublish then OnQosComplete for a written PUBACK, and
// OnQosPublish then OnQosDropped for one that could not be written, whose
// receive quota is given back.
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
		// Not kept: a session that inherits Inflight writes what it holds
		// at once, and this PUBACK's message may never have been stored
		// (the write failed because the session ended).
		_, ok := cl.State.Inflight.Get(pk.PacketID)
		require.False(t, ok, "an unsent PUBACK must not be kept for a later connection to resend")
		require.Equal(t, 0, cl.State.Inflight.Len())
		require.Equal(t, int64(0), atomic.LoadInt64(&s.Info.Inflight))
		require.Equal(t, int32(10), atomic.LoadInt32(&cl.State.Inflight.receiveQuota))
		require.Equal(t, []string{"publish", "dropped"}, rec.events)
	})
}

// TestBastionInboundPublishKeepsOutboundInflight (Bastion patch (15)): an
// inbound QoS 1 PUBLISH whose packet id is that of an outbound QoS 1
// message still waiting for its PUBACK leaves that message in Inflight
// (client and server pick ids independently, MQTT 5.0 section 2.2.1), and
// the client's PUBACK for it then completes it and gives its send quota
// back. Unpatched, the inbound PUBLISH deleted the outbound entry.
func TestBastionInboundPublishKeepsOutboundInflight(t *testing.T) {
	s := newServer()
	rec := new(qosRecorder)
	require.NoError(t, s.AddHook(rec, nil))
	cl, r, _ := newTestClient()
	s.Clients.Add(cl)
	t.Cleanup(func() { _ = r.Close() })
	go func() { _, _ = io.Copy(io.Discard, r) }()

	out, err := s.publishToClient(cl, packets.Subscription{Filter: "cmd/#", Qos: 1}, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   "cmd/reboot",
		Payload:     []byte("now"),
	})
	require.NoError(t, err)
	require.NotZero(t, out.PacketID)
	maxSend := atomic.LoadInt32(&cl.State.Inflight.maximumSendQuota)
	require.Equal(t, maxSend-1, atomic.LoadInt32(&cl.State.Inflight.sendQuota))

	in := *packets.TPacketData[packets.Publish].Get(packets.TPublishQos1).Packet
	in.PacketID = out.PacketID
	require.NoError(t, s.processPublish(cl, in))

	got, ok := cl.State.Inflight.Get(out.PacketID)
	require.True(t, ok, "the outbound message's entry was deleted by an inbound PUBLISH of the same id")
	require.Equal(t, packets.Publish, got.FixedHeader.Type)
	require.Equal(t, "cmd/reboot", got.TopicName)
	require.Equal(t, int64(1), atomic.LoadInt64(&s.Info.Inflight))

	require.NoError(t, s.processPuback(cl, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Puback},
		PacketID:    out.PacketID,
	}))
	require.Equal(t, 0, cl.State.Inflight.Len())
	require.Equal(t, int64(0), atomic.LoadInt64(&s.Info.Inflight))
	require.Equal(t, maxSend, atomic.LoadInt32(&cl.State.Inflight.sendQuota), "the send quota was not given back")
	rec.mu.Lock()
	defer rec.mu.Unlock()
	// The outbound message, the inbound one's PUBACK (written, complete),
	// then the outbound message's completion.
	require.Equal(t, []string{"publish", "publish", "complete", "complete"}, rec.events)
}

// TestBastionPubackReasonSuccess (Bastion patch (21)): the PUBACK of an
// MQTT 5 QoS 1 PUBLISH with user properties, which it inherits, carries
// reason 0x00 success. Upstream gave it 0x01 (the SUBACK code granted
// QoS 1, no PUBACK reason code), written whenever the PUBACK had
// properties to encode.
func TestBastionPubackReasonSuccess(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	s.Clients.Add(cl)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 7,
		TopicName: "a/b", Payload: []byte("x"), ProtocolVersion: 5,
		Properties: packets.Properties{User: []packets.UserProperty{{Key: "k", Val: "v"}}}}
	got := make(chan []byte)
	go func() {
		buf, _ := io.ReadAll(r)
		got <- buf
	}()
	require.NoError(t, s.processPublish(cl, pk))
	_ = w.Close()
	buf := <-got
	require.Greater(t, len(buf), 2)
	ack := packets.Packet{ProtocolVersion: 5}
	require.NoError(t, ack.FixedHeader.Decode(buf[0]))
	ack.FixedHeader.Remaining = int(buf[1])
	require.Equal(t, len(buf)-2, ack.FixedHeader.Remaining)
	require.Equal(t, packets.Puback, ack.FixedHeader.Type)
	require.NoError(t, ack.PubackDecode(buf[2:]))
	require.Equal(t, uint16(7), ack.PacketID)
	require.Equal(t, packets.CodeSuccess.Code, ack.ReasonCode)
	require.Equal(t, pk.Properties.User, ack.Properties.User, "inherited: NoInheritedPropertiesOnAck is not set here")
}

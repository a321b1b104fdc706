package mqtt

import (
	"bytes"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// droppedHook counts OnPublishDropped per client.
type droppedHook struct {
	HookBase
	n atomic.Int64
}

func (h *droppedHook) ID() string                                   { return "dropped" }
func (h *droppedHook) Provides(b byte) bool                         { return b == OnPublishDropped }
func (h *droppedHook) OnPublishDropped(_ *Client, _ packets.Packet) { h.n.Add(1) }

// heldServer is a server with an inline client whose clients may hold
// perClient bytes each and total in all.
func heldServer(t *testing.T, perClient, total int64) (*Server, *droppedHook) {
	t.Helper()
	s := newServerWithInlineClient()
	s.Options.Capabilities.MaximumClientHeldBytes = perClient
	s.Options.Capabilities.MaximumHeldBytes = total
	h := new(droppedHook)
	require.NoError(t, s.AddHook(h, nil))
	return s, h
}

// offlineClient adds a client whose connection has ended, subscribed to
// filter at qos: a session kept for its next connection.
func offlineClient(s *Server, id, filter string, qos byte) *Client {
	cl := s.NewClient(nil, "tcp", id, false)
	cl.Stop(nil)
	s.Clients.Add(cl)
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: filter, Qos: qos})
	cl.State.Subscriptions.Add(filter, packets.Subscription{Filter: filter, Qos: qos})
	return cl
}

// deliveredSize is the HeldSize of a message on topic as delivered to a
// subscriber: mochi gives each delivery its subscription's identifiers
// (the identifier 0 for a subscription without one).
func deliveredSize(topic string, payload []byte) int64 {
	return HeldSize(&packets.Packet{TopicName: topic, Payload: payload,
		Properties: packets.Properties{SubscriptionIdentifier: []int{0}}})
}

// sumHeld is what the clients of s hold, by their own counts.
func sumHeld(s *Server) int64 {
	var n int64
	for _, cl := range s.Clients.GetAll() {
		n += cl.HeldBytes()
	}
	return n
}

// TestBastionHeldBytesPerClient (Bastion patch (17)): QoS 1 messages to a
// disconnected session are held in its Inflight for its next connection;
// upstream held up to MaximumInflight of them whatever their size. Past
// MaximumClientHeldBytes they are not taken (PublishTaken counts 0, the
// hook is told), the bytes held stay within the bound and the server's
// count is the sum of its clients'. Each message deleted (acknowledged,
// expired, cleared) gives its bytes back.
func TestBastionHeldBytesPerClient(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), 1000)
	size := deliveredSize("a/b", payload)
	limit := 5*size + size/2 // room for five
	s, dropped := heldServer(t, limit, 0)
	cl := offlineClient(s, "dev", "a/#", 1)

	taken := 0
	for i := 0; i < 20; i++ {
		n, err := s.PublishTaken("a/b", payload, false, 1)
		require.NoError(t, err)
		taken += n
		require.LessOrEqual(t, cl.HeldBytes(), limit)
	}
	require.Equal(t, 5, taken)
	require.Equal(t, 5, cl.State.Inflight.Len())
	require.Equal(t, int64(15), dropped.n.Load())
	require.Equal(t, 5*size, cl.HeldBytes())
	require.Equal(t, sumHeld(s), s.HeldBytes())

	cl.ClearInflights()
	require.Zero(t, cl.HeldBytes())
	require.Zero(t, s.HeldBytes())
	n, err := s.PublishTaken("a/b", payload, false, 1)
	require.NoError(t, err)
	require.Equal(t, 1, n, "room again once the held messages are gone")
}

// TestBastionHeldOneOverTheBound: a client holding nothing takes one
// message larger than its bound (so that such a message still reaches a
// client that reads), and nothing more while it holds it.
func TestBastionHeldOneOverTheBound(t *testing.T) {
	s, _ := heldServer(t, 2048, 0)
	cl := offlineClient(s, "dev", "a/#", 1)
	big := bytes.Repeat([]byte("x"), 8000)
	n, err := s.PublishTaken("a/b", big, false, 1)
	require.NoError(t, err)
	require.Equal(t, 1, n)
	n, err = s.PublishTaken("a/b", []byte("small"), false, 1)
	require.NoError(t, err)
	require.Zero(t, n)
	require.Equal(t, deliveredSize("a/b", big), cl.HeldBytes())
}

// TestBastionHeldBytesTotal: MaximumHeldBytes bounds what all clients
// hold together, also for a client that holds nothing.
func TestBastionHeldBytesTotal(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), 500)
	size := deliveredSize("a/b", payload)
	total := 7 * size
	s, dropped := heldServer(t, 4*size, total)
	a := offlineClient(s, "a", "a/#", 1)
	b := offlineClient(s, "b", "a/#", 1)
	c := offlineClient(s, "c", "a/#", 1)
	for i := 0; i < 10; i++ {
		_, err := s.PublishTaken("a/b", payload, false, 1)
		require.NoError(t, err)
		require.LessOrEqual(t, s.HeldBytes(), total)
	}
	require.Equal(t, total, s.HeldBytes())
	require.Equal(t, sumHeld(s), s.HeldBytes())
	require.Equal(t, int64(30-7), dropped.n.Load())
	require.LessOrEqual(t, a.HeldBytes(), 4*size)
	b.ClearInflights()
	c.ClearInflights()
	require.Equal(t, a.HeldBytes(), s.HeldBytes())
}

// TestBastionHeldQueuedQoS0: QoS 0 messages queued for a connected client
// that does not read are counted while queued and bounded with the rest;
// when the client stops, its queue is emptied and what it held given back
// (upstream left the packets in the queue of a session kept for its next
// connection, for an hour).
func TestBastionHeldQueuedQoS0(t *testing.T) {
	payload := bytes.Repeat([]byte("x"), 1000)
	size := deliveredSize("a/b", payload)
	limit := 3*size + size/2
	s, dropped := heldServer(t, limit, 0)
	s.Options.Capabilities.MaximumClientWritesPending = 64
	r, w := net.Pipe() // nobody reads r: the first write waits
	defer r.Close()
	cl := s.NewClient(w, "tcp", "dev", false)
	s.Clients.Add(cl)
	s.Topics.Subscribe(cl.ID, packets.Subscription{Filter: "a/#"})

	taken := 0
	for i := 0; i < 20; i++ {
		n, err := s.PublishTaken("a/b", payload, false, 0)
		require.NoError(t, err)
		taken += n
		require.LessOrEqual(t, cl.HeldBytes(), limit)
	}
	// Three fill the bound; the writer may have taken a packet or two off
	// the queue into its write buffer (2 KiB, ClientNetWriteBufferSize)
	// before a write waited on the pipe, which made room for as many more.
	// The one in the waiting write is held until the write returns.
	require.GreaterOrEqual(t, taken, 3)
	require.LessOrEqual(t, taken, 6)
	require.Equal(t, int64(20-taken), dropped.n.Load())
	require.Equal(t, s.HeldBytes(), cl.HeldBytes())

	cl.Stop(nil) // closes the pipe: the write under way fails
	require.Zero(t, len(cl.State.outbound))
	deadline := time.Now().Add(5 * time.Second)
	for cl.State.writing.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.False(t, cl.State.writing.Load(), "the writer did not end")
	require.Zero(t, cl.HeldBytes())
	require.Zero(t, s.HeldBytes())
}

// TestBastionHeldTakeover: a session taken over hands its held messages to
// the new client, and the server's count is what the new client holds
// once the old one has dropped its copies.
func TestBastionHeldTakeover(t *testing.T) {
	s, _ := heldServer(t, 0, 0)
	old := offlineClient(s, "dev", "a/#", 1)
	for i := 0; i < 3; i++ {
		_, err := s.PublishTaken("a/b", []byte("cmd"), false, 1)
		require.NoError(t, err)
	}
	held := old.HeldBytes()
	require.Positive(t, held)

	cl := s.NewClient(nil, "tcp", "dev", false)
	require.True(t, s.inheritClientSession(packets.Packet{}, cl))
	require.Equal(t, held, cl.HeldBytes())
	require.Zero(t, old.HeldBytes())
	require.Equal(t, held, s.HeldBytes())
}

// TestBastionHeldBytes: the bytes a packet is counted at.
func TestBastionHeldBytes(t *testing.T) {
	pk := packets.Packet{TopicName: "abc", Payload: []byte("12345"), Properties: packets.Properties{
		ContentType: "ct", CorrelationData: []byte("cd"), ResponseTopic: "rt",
		User:                   []packets.UserProperty{{Key: "k", Val: "vv"}, {}},
		SubscriptionIdentifier: []int{1, 2},
	}}
	require.Equal(t, 3+5+2+2+2+(32+1+2)+32+16, pk.HeldBytes())
	require.Equal(t, int64(heldPacketOverhead+pk.HeldBytes()), HeldSize(&pk))
}

// TestBastionDropInflights: DropInflights empties a disconnected session's
// Inflight and gives back what it held, and drops nothing from one a new
// connection is taking over (sealed: its messages are the new client's).
func TestBastionDropInflights(t *testing.T) {
	s, _ := heldServer(t, 0, 0)
	cl := offlineClient(s, "dev", "a/#", 1)
	for i := 0; i < 3; i++ {
		_, err := s.PublishTaken("a/b", []byte("cmd"), false, 1)
		require.NoError(t, err)
	}
	held := cl.HeldBytes()
	require.Positive(t, held)

	n, b := cl.DropInflights()
	require.Equal(t, 3, n)
	require.Equal(t, held, b)
	require.Zero(t, cl.HeldBytes())
	require.Zero(t, s.HeldBytes())
	require.Zero(t, cl.State.Inflight.Len())

	_, err := s.PublishTaken("a/b", []byte("cmd"), false, 1)
	require.NoError(t, err)
	cl.State.Inflight.cloneAndSeal() // what a takeover does before it clears cl
	n, _ = cl.DropInflights()
	require.Zero(t, n, "taken over: its messages are the new client's")
	require.Equal(t, 1, cl.State.Inflight.Len())
}

// TestBastionInflightOrder (Bastion patch (18)): GetAll, which a resumed
// session's resend and NextImmediate use, returns the messages of one
// second in the order they were added (upstream: in the map's random
// order), after those of earlier seconds; a clone keeps the order.
func TestBastionInflightOrder(t *testing.T) {
	in := NewInflights()
	var want []uint16
	for k := 0; k < 50; k++ {
		id := uint16(1000 - 7*k) // ids that do not sort like the order
		in.Set(packets.Packet{PacketID: id, Created: 100})
		want = append(want, id)
	}
	in.Set(packets.Packet{PacketID: 5, Created: 99}) // an earlier second, added last
	want = append([]uint16{5}, want...)
	in.Set(packets.Packet{PacketID: want[10], Created: 100, Expiry: -1}) // replaced: keeps its place
	in.Delete(want[20])
	want = append(want[:20:20], want[21:]...)

	ids := func(pks []packets.Packet) []uint16 {
		var out []uint16
		for _, pk := range pks {
			out = append(out, pk.PacketID)
		}
		return out
	}
	require.Equal(t, want, ids(in.GetAll(false)))
	require.Equal(t, want, ids(in.Clone().GetAll(false)))
	require.Equal(t, want, ids(in.cloneAndSeal().GetAll(false)))
}

// takeoverHook runs a takeover of the session it is told of, once, from
// OnQosPublish: between the store of a message in the old client's
// Inflight and the rest of publishToClient.
type takeoverHook struct {
	HookBase
	s    *Server
	once atomic.Bool
	to   *Client
}

func (h *takeoverHook) ID() string           { return "takeover" }
func (h *takeoverHook) Provides(b byte) bool { return b == OnQosPublish }
func (h *takeoverHook) OnQosPublish(cl *Client, _ packets.Packet, _ int64, _ int) {
	if h.once.CompareAndSwap(false, true) {
		h.s.inheritClientSession(packets.Packet{}, h.to)
	}
}

// TestBastionWaitingMessageTakeover (Bastion patch (23)): a QoS 1 message
// to a client with no send quota left is stored waiting in one step. A
// takeover right after the store (here from OnQosPublish) takes it with
// the session; upstream then Set it again in the old client's Inflight,
// cleared by the takeover, and the server counted its bytes for good.
func TestBastionWaitingMessageTakeover(t *testing.T) {
	s, _ := heldServer(t, 0, 0)
	old := offlineClient(s, "dev", "a/#", 1)
	old.State.Inflight.ResetSendQuota(1)
	old.State.Inflight.DecreaseSendQuota()
	require.Zero(t, atomic.LoadInt32(&old.State.Inflight.sendQuota))
	h := &takeoverHook{s: s, to: s.NewClient(nil, "tcp", "dev", false)}
	require.NoError(t, s.AddHook(h, nil))

	_, err := s.PublishTaken("a/b", []byte("cmd"), false, 1)
	require.NoError(t, err)
	require.True(t, h.once.Load(), "the takeover did not run")
	require.Zero(t, old.HeldBytes(), "the old client holds the message after the takeover")
	require.Equal(t, h.to.HeldBytes(), s.HeldBytes(), "the server counts bytes no client holds")
	msgs := h.to.State.Inflight.GetAll(false)
	require.Len(t, msgs, 1)
	require.Equal(t, int64(-1), msgs[0].Expiry, "the message does not wait for quota")
}

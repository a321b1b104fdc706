package mqtt

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestBastionEndedSessionKeepsItsSuccessor (Bastion patch (10)): a clean
// session that ends after a new connection of the same client id has been
// added (its goroutine passed the IsTakenOver check before the takeover
// set it) must not delete the new client or its subscriptions. Unpatched,
// it deleted whatever client was held under the id.
func TestBastionEndedSessionKeepsItsSuccessor(t *testing.T) {
	s := newServer()
	defer s.Close()
	id := packets.TPacketData[packets.Connect].Get(packets.TConnectClean).Packet.Connect.ClientIdentifier

	r, w := net.Pipe()
	o := make(chan error, 1)
	go func() { o <- s.EstablishConnection("tcp", r) }()
	go func() { _, _ = io.Copy(io.Discard, w) }() // the CONNACK
	_, err := w.Write(packets.TPacketData[packets.Connect].Get(packets.TConnectClean).RawBytes)
	require.NoError(t, err)
	deadline := time.Now().Add(5 * time.Second)
	var old *Client
	for {
		if cl, ok := s.Clients.Get(id); ok {
			old = cl
			break
		}
		require.True(t, time.Now().Before(deadline), "the first session was never added")
		time.Sleep(time.Millisecond)
	}

	// The successor, added (and subscribed) before the first session's
	// goroutine reaches its cleanup.
	next, _, _ := newTestClient()
	next.ID = id
	next.Properties.Clean = true
	sub := packets.Subscription{Filter: "a/b", Qos: 1}
	s.Topics.Subscribe(id, sub)
	next.State.Subscriptions.Add(sub.Filter, sub)
	s.Clients.Add(next)

	_, err = w.Write(packets.TPacketData[packets.Disconnect].Get(packets.TDisconnect).RawBytes)
	require.NoError(t, err)
	select {
	case err := <-o:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("the first session did not end")
	}
	require.False(t, old.IsTakenOver())

	cur, ok := s.Clients.Get(id)
	require.True(t, ok, "the ended session deleted its successor")
	require.Same(t, next, cur)
	require.Equal(t, 1, next.State.Subscriptions.Len())
	require.True(t, s.Topics.Subscribers("a/b").Subscriptions[id].Filter == "a/b", "the successor's subscription is gone")
	_ = w.Close()
}

// qosDroppedHook runs f the first time the broker reports an inflight
// message of client target dropped: in a takeover, when it clears the
// inflight messages of the session it took over, after it copied them and
// before the new client is added to Clients.
type qosDroppedHook struct {
	HookBase
	target *Client
	f      func()
}

func (h *qosDroppedHook) ID() string { return "qos-dropped" }
func (h *qosDroppedHook) Provides(b byte) bool {
	return b == OnQosDropped
}
func (h *qosDroppedHook) OnQosDropped(cl *Client, pk packets.Packet) {
	if cl == h.target && h.f != nil {
		h.f()
		h.f = nil
	}
}

// connackHook runs f the first time the broker encodes a CONNACK for a
// client other than old.
type connackHook struct {
	HookBase
	old *Client
	f   func(*Client)
}

func (h *connackHook) ID() string { return "connack" }
func (h *connackHook) Provides(b byte) bool {
	return b == OnPacketEncode
}
func (h *connackHook) OnPacketEncode(cl *Client, pk packets.Packet) packets.Packet {
	if cl != h.old && pk.FixedHeader.Type == packets.Connack && h.f != nil {
		h.f(cl)
		h.f = nil
	}
	return pk
}

// eventually reports whether cond holds within 5 s (polled; for hooks,
// which may not end the test).
func eventually(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if cond() {
			return true
		}
	}
	return false
}

// inflightHolds reports whether cl has an inflight message with payload.
func inflightHolds(cl *Client, payload string) bool {
	for _, pk := range cl.State.Inflight.GetAll(false) {
		if string(pk.Payload) == payload {
			return true
		}
	}
	return false
}

// TestBastionPublishDuringTakeover (Bastion patch (14)): a QoS 1 message
// published to a session while a new connection of its id takes it over
// (after the takeover copied the session's inflight messages, before the
// new client is in Clients) reaches the new client, after its CONNACK.
// Unpatched, it was added to the old client's inflight messages, which
// nothing sends any more: lost. (Sent to the new client as soon as that
// is in Clients, it could go out before the CONNACK: the test holds the
// CONNACK until the message has reached the new client or waits.)
func TestBastionPublishDuringTakeover(t *testing.T) {
	s := newServerWithInlineClient()
	defer s.Close()
	const id = "dev1"
	oldConn, old := bastionDial(t, s, id, false, 60)
	defer oldConn.w.Close() // before s.Close, which waits for the sessions
	oldConn.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "a/b", Qos: 1}}})
	bastionWait(t, "the subscription", func() bool { return old.State.Subscriptions.Len() == 1 })
	// A message the session holds, never acknowledged: the takeover copies
	// it, and clears it from the old client (OnQosDropped).
	require.NoError(t, s.Publish("a/b", []byte("first"), false, 1))
	bastionWait(t, "the first message in flight", func() bool { return old.State.Inflight.Len() == 1 })

	published := make(chan struct{})
	ran := false
	require.NoError(t, s.AddHook(&qosDroppedHook{target: old, f: func() {
		ran = true
		go func() {
			assert.NoError(t, s.Publish("a/b", []byte("second"), false, 1))
			close(published)
		}()
		// Until the publish has put the message somewhere, or waits for
		// the session lock the takeover holds.
		if !eventually(func() bool {
			select {
			case <-published:
				return true
			default:
			}
			return inflightHolds(old, "second") || s.Clients.sessionLockUsers(id) > 1
		}) {
			t.Error("the publish during the takeover neither added its message nor waited")
		}
	}}, nil))
	// And holds the new client's CONNACK until the message waits for the
	// takeover, or is in flight to the new client (and on its way out,
	// before the CONNACK).
	require.NoError(t, s.AddHook(&connackHook{old: old, f: func(next *Client) {
		if !eventually(func() bool {
			return s.Clients.sessionLockUsers(id) > 1 || inflightHolds(next, "second") || inflightHolds(old, "second")
		}) {
			t.Error("the publish during the takeover neither waited nor added its message")
		}
	}}, nil))

	// The new connection, whose packets are read in order.
	r, w := net.Pipe()
	defer w.Close()
	done := make(chan error, 1)
	go func() { done <- s.EstablishConnection("tcp", r) }()
	got := make(chan packets.Packet, 16)
	go func() {
		defer close(got)
		br := bufio.NewReader(w)
		for {
			b, err := br.ReadByte()
			if err != nil {
				return
			}
			pk := packets.Packet{ProtocolVersion: 5}
			if pk.FixedHeader.Decode(b) != nil {
				return
			}
			n, _, err := packets.DecodeLength(br)
			if err != nil {
				return
			}
			body := make([]byte, n)
			if _, err := io.ReadFull(br, body); err != nil {
				return
			}
			if pk.FixedHeader.Type == packets.Publish && pk.PublishDecode(body) != nil {
				return
			}
			got <- pk
		}
	}()
	var buf bytes.Buffer
	require.NoError(t, (&packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect:    packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: false, Keepalive: 60, ClientIdentifier: id},
		Properties: packets.Properties{SessionExpiryInterval: 60, SessionExpiryIntervalFlag: true}}).ConnectEncode(&buf))
	_, err := w.Write(buf.Bytes())
	require.NoError(t, err)

	select {
	case <-published:
	case <-time.After(5 * time.Second):
		t.Fatal("the publish during the takeover did not return")
	}
	require.True(t, ran, "the takeover cleared no inflight message of the old session")
	var types []byte
	seen := map[string]bool{}
	timeout := time.After(2 * time.Second)
	for !seen["second"] {
		select {
		case pk, ok := <-got:
			require.True(t, ok, "the new connection ended; it got packet types %v", types)
			types = append(types, pk.FixedHeader.Type)
			if pk.FixedHeader.Type == packets.Publish {
				seen[string(pk.Payload)] = true
			}
		case <-timeout:
			t.Fatalf("the message published during the takeover did not reach the new session (packet types %v)", types)
		}
	}
	require.Equal(t, packets.Connack, types[0], "the new session got packet types %v, CONNACK not first", types)
	require.False(t, inflightHolds(old, "second"), "the message is kept by the old client")
	next, ok := s.Clients.Get(id)
	require.True(t, ok)
	require.True(t, inflightHolds(next, "second"), "the message is not in flight to the new session")
	require.NotSame(t, old, next)
}

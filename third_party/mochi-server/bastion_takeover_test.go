package mqtt

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
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

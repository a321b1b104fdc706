package mqtt

import (
	"sync/atomic"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/queue"
)

// connsOf returns how many connections of id the server holds in conns.
func (s *Server) connsOf(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns[id])
}

// connect sends a clean MQTT 5 CONNECT for the device's id.
func (d *device) connect() {
	d.t.Helper()
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: d.id}})
}

// TestAcceptRaceKeepsNewerSession: of two CONNECTs of one device, the one
// accepted first is held just after its acceptance, until the second has
// been accepted, has taken the session over and has its success CONNACK.
// The second must stay open. accept looked for the session held in mochi's
// Clients after releasing the server's lock, found the second there (not
// among the sessions it replaced) and ended it too, and the first was
// already ended by the second: the device was left with no session.
func TestAcceptRaceKeepsNewerSession(t *testing.T) {
	r := newRig(t, queue.Options{})
	entered, release := make(chan struct{}), make(chan struct{})
	var first atomic.Bool
	r.s.mu.Lock()
	r.s.afterAccept = func(*mochi.Client) {
		if first.CompareAndSwap(false, true) {
			close(entered)
			select {
			case <-release:
			case <-time.After(10 * time.Second):
			}
		}
	}
	r.s.mu.Unlock()

	b1 := r.dialTLS(t, "d1", 5, true)
	b1.connect()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first CONNECT was not accepted")
	}
	b2 := r.dial(t, "d1", 5) // accepted, took the session over, CONNACK read
	close(release)
	b1.closedWithin(time.Second, "a newer session of the device was accepted")
	waitFor(t, "the first connection to end", func() bool { return r.s.connsOf("d1") <= 1 })
	if !b2.open() {
		t.Fatal("the newer session was ended: the device has no session")
	}
	if cl, ok := r.s.mq.Clients.Get("d1"); !ok || cl.Closed() {
		t.Fatal("mochi's Clients does not hold the open session")
	}
}

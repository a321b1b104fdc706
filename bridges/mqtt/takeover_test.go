package mqtt

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/pki"
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
	entered, release := holdFirstAccept(r)

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

// TestSlowCheckDoesNotEndNewerSession: a CONNECT whose credential check
// (a secret login's argon2id) is still running when a later CONNECT of
// the device is accepted is refused once its check ends (no success
// CONNACK, counted as session_taken_over) and leaves the later session
// open. Which CONNECT won depended on when its check ended: the earlier
// one ended the live later session and took the session over, for a
// connection its device had most likely given up.
func TestSlowCheckDoesNotEndNewerSession(t *testing.T) {
	for _, tc := range []struct {
		ver  byte
		want byte // the earlier CONNECT's CONNACK
	}{{5, packets.ErrUnspecifiedError.Code}, {4, packets.Err3ServerUnavailable.Code}} {
		t.Run(fmt.Sprintf("v%d", tc.ver), func(t *testing.T) {
			id := &slowIdentity{stallAt: 1, stalled: make(chan chan struct{}), revoked: map[string]bool{}}
			r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true}, func(ca *pki.CA) bridges.Identity {
				id.caIdentity = caIdentity{ca}
				return id
			})
			a := r.dialTLS(t, "d1", tc.ver, false) // secret login: the first check, stalled
			a.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
				Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "d1",
					Username: []byte("d1"), UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true}})
			var release chan struct{}
			select {
			case release = <-id.stalled:
			case <-time.After(10 * time.Second):
				t.Fatal("the first CONNECT's secret check never ran")
			}
			b := r.dial(t, "d1", tc.ver) // certificate: accepted while the first is checked
			before := r.refusals(hub.ReasonSessionTakenOver)
			close(release)

			pk, err := a.readErr(5 * time.Second)
			switch {
			case isTimeout(err):
				t.Fatal("the earlier CONNECT got no answer")
			case err == nil && (pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != tc.want):
				t.Fatalf("the earlier CONNECT got packet type %d reason %#x, want CONNACK %#x", pk.FixedHeader.Type, pk.ReasonCode, tc.want)
			}
			a.closedWithin(time.Second, "its refusal")
			if !b.open() {
				t.Fatal("the later session was ended by the earlier CONNECT, whose check ended after it was accepted")
			}
			if got := r.refusals(hub.ReasonSessionTakenOver) - before; got != 1 {
				t.Errorf("session_taken_over refusals counted %v, want 1", got)
			}
			if cl, ok := r.s.mq.Clients.Get("d1"); !ok || cl.Closed() || cl.Net.Remote != b.c.LocalAddr().String() {
				t.Fatal("mochi's Clients does not hold the later session")
			}
		})
	}
}

// TestShutdownEndsSessionBeingEstablished: a CONNECT accepted (past its
// credential check) but not yet in mochi's Clients when the server shuts
// down is ended too: shutdown returns within 1 s of the CONNECT going on.
// Close ended only the clients in Clients and the connections not yet
// authenticated; this one got its CONNACK afterwards and held the
// shutdown until its keepalive ran out (90 s).
func TestShutdownEndsSessionBeingEstablished(t *testing.T) {
	r := newRig(t, queue.Options{})
	b := &establishBarrier{n: 1, all: make(chan struct{}), release: make(chan struct{})}
	if err := r.s.mq.AddHook(b, nil); err != nil {
		t.Fatal(err)
	}
	d := r.dialTLS(t, "d1", 5, true)
	d.connect()
	select {
	case <-b.all:
	case <-time.After(10 * time.Second):
		t.Fatal("the CONNECT was not accepted")
	}
	b.mu.Lock()
	held := b.arrived[0]
	b.mu.Unlock()

	stopped := make(chan error, 1)
	go func() { stopped <- r.stop() }()
	// Until the shutdown has ended it, or has certainly looked at mochi's
	// Clients and found nothing there.
	for deadline := time.Now().Add(time.Second); !held.Closed() && time.Now().Before(deadline); {
		time.Sleep(2 * time.Millisecond)
	}
	close(b.release)
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Second):
		d.c.Close() // lets the shutdown end, for the test's cleanup
		t.Fatal("shutdown still waiting 1 s after the CONNECT being established went on")
	}
	if pk, err := d.readErr(time.Second); err == nil {
		t.Fatalf("the device got packet type %d reason %#x after the shutdown began, want the connection closed", pk.FixedHeader.Type, pk.ReasonCode)
	}
}

// holdFirstAccept holds the first CONNECT r's server accepts just after its
// acceptance (afterAccept): entered is closed when it is held, and it goes
// on when release is closed (or after 10 s).
func holdFirstAccept(r *rig) (entered, release chan struct{}) {
	entered, release = make(chan struct{}), make(chan struct{})
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
	return entered, release
}

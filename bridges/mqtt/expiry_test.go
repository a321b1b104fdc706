package mqtt

import (
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestDisconnectSessionExpiryCapped: the session expiry interval a
// DISCONNECT sets is capped at SessionExpiry, as the CONNECT's is, and the
// session then expires after it; and a session whose CONNECT had none gets
// DISCONNECT 0x82 protocol error for one in its DISCONNECT (MQTT 5
// §3.14.2.2.2). mochi kept 0xFFFFFFFF as sent: 136 years.
func TestDisconnectSessionExpiryCapped(t *testing.T) {
	r := newRigWith(t, queue.Options{}, Config{SessionExpiry: 2 * time.Second}, nil)
	connect := func(expiry uint32) *device {
		d := r.dialTLS(t, "deva", 5, true)
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect:    packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "deva"},
			Properties: packets.Properties{SessionExpiryInterval: expiry, SessionExpiryIntervalFlag: true}})
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
			t.Fatalf("CONNACK: type %d reason %#x", pk.FixedHeader.Type, pk.ReasonCode)
		}
		waitFor(t, "the session", func() bool { return r.s.SessionCount() == 1 })
		return d
	}
	disconnect := func(d *device, expiry uint32) {
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
			Properties: packets.Properties{SessionExpiryInterval: expiry, SessionExpiryIntervalFlag: true}})
	}

	d := connect(1)
	cl, ok := r.s.mq.Clients.Get("deva")
	if !ok {
		t.Fatal("no session")
	}
	disconnect(d, 0xFFFFFFFF)
	d.closed()
	waitFor(t, "the session to end", func() bool { return cl.Closed() })
	if got := cl.Properties.Props.SessionExpiryInterval; got > 2 {
		t.Fatalf("the session is kept for %d s after its DISCONNECT asked for 0xFFFFFFFF, the maximum is 2 s", got)
	}
	waitFor(t, "the session to expire", func() bool {
		_, ok := r.s.mq.Clients.Get("deva")
		return !ok
	})

	d = connect(0)
	disconnect(d, 10)
	pk, err := d.readErr(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrProtocolViolationZeroNonZeroExpiry.Code {
		t.Fatalf("got packet type %d reason %#x (err %v), want DISCONNECT %#x", pk.FixedHeader.Type, pk.ReasonCode, err,
			packets.ErrProtocolViolationZeroNonZeroExpiry.Code)
	}
	d.closed()
}

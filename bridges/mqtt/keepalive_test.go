package mqtt

import (
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/queue"
)

// connectKeepalive connects device id (MQTT version ver) asking for
// keepalive ka and returns it with its CONNACK.
func connectKeepalive(t *testing.T, r *rig, id string, ver byte, ka uint16) (*device, packets.Packet) {
	t.Helper()
	d := r.dialTLS(t, id, ver, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: ka, ClientIdentifier: id}})
	pk := d.read(5 * time.Second)
	if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("%s: CONNACK: got type %d reason %#x", id, pk.FixedHeader.Type, pk.ReasonCode)
	}
	return d, pk
}

// TestKeepaliveCap: a device asking for no keepalive (0) or one longer
// than MaxKeepalive gets MaxKeepalive, which an MQTT 5 device is told in
// the CONNACK's Server Keep Alive; and the session of a silent device
// ends once 1.5 times that has passed, as for a device that asked for it
// (a dead device's session does not live on for ever or for hours).
func TestKeepaliveCap(t *testing.T) {
	const maxKA = 1 // second: the smallest cap, so the idle test is short
	r := newRigWith(t, queue.Options{}, Config{MaxKeepalive: maxKA}, nil)
	for _, ka := range []uint16{0, 600} {
		t.Run(fmt.Sprintf("v5 keepalive %d", ka), func(t *testing.T) {
			_, pk := connectKeepalive(t, r, fmt.Sprintf("ka5-%d", ka), 5, ka)
			if !pk.Properties.ServerKeepAliveFlag || pk.Properties.ServerKeepAlive != maxKA {
				t.Errorf("CONNACK Server Keep Alive: set %v, %d; want set, %d", pk.Properties.ServerKeepAliveFlag, pk.Properties.ServerKeepAlive, maxKA)
			}
		})
		t.Run(fmt.Sprintf("v3.1.1 idle keepalive %d", ka), func(t *testing.T) {
			d, _ := connectKeepalive(t, r, fmt.Sprintf("ka4-%d", ka), 4, ka)
			// mochi closes after keepalive+keepalive/2 whole seconds,
			// 1 s here; 10 s leaves a loaded box room and is far below
			// 900 s (a keepalive of 600) or never (0).
			d.endedWithin(10*time.Second, "idling past a keepalive cap of 1 s")
		})
	}
	// A keepalive within the cap is the device's own: no Server Keep Alive.
	_, pk := connectKeepalive(t, r, "ka5-own", 5, maxKA)
	if pk.Properties.ServerKeepAliveFlag {
		t.Errorf("CONNACK for a keepalive within the cap has Server Keep Alive %d", pk.Properties.ServerKeepAlive)
	}
}

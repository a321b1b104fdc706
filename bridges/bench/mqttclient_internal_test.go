package bench

import (
	"bytes"
	"net"
	"testing"

	"github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"
)

// countingConn records each Write as its own chunk.
type countingConn struct {
	net.Conn
	writes [][]byte
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes = append(c.writes, bytes.Clone(p))
	return len(p), nil
}

// TestPacketConnOneWritePerPacket: paho writes a PUBLISH in several Write
// calls; through packetConn the connection sees one Write per packet with
// the same bytes, so a TLS connection below sends one record.
func TestPacketConnOneWritePerPacket(t *testing.T) {
	pub := &packets.Publish{Topic: "devices/d1/t/bench", QoS: 0, Payload: bytes.Repeat([]byte{7}, 100)}
	var want bytes.Buffer
	if _, err := pub.WriteTo(&want); err != nil {
		t.Fatal(err)
	}

	plain := &countingConn{}
	if _, err := pub.WriteTo(plain); err != nil {
		t.Fatal(err)
	}
	if len(plain.writes) < 2 {
		t.Fatalf("paho wrote a PUBLISH in %d Write calls; this test assumes several", len(plain.writes))
	}

	under := &countingConn{}
	pc := &packetConn{Conn: under}
	for range 2 {
		if _, err := pub.WriteTo(pc); err != nil {
			t.Fatal(err)
		}
	}
	if diff := cmp.Diff([][]byte{want.Bytes(), want.Bytes()}, under.writes); diff != "" {
		t.Errorf("writes through packetConn (-want +got):\n%s", diff)
	}
}

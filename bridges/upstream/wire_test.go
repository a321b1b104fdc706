package upstream

import (
	"bytes"
	"strconv"
	"strings"
	"testing"

	"github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"
)

// pahoPublish is the PUBLISH as paho's encoder writes it.
func pahoPublish(id uint16, qos byte, topic string, payload []byte, gateway string, seq uint64) []byte {
	p := packets.Publish{PacketID: id, QoS: qos, Topic: topic, Payload: payload,
		Properties: &packets.Properties{User: []packets.User{
			{Key: OriginProperty, Value: gateway},
			{Key: SeqProperty, Value: strconv.FormatUint(seq, 10)},
		}}}
	var b bytes.Buffer
	if _, err := p.WriteTo(&b); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// TestAppendPublish: the link's own PUBLISH encoder writes exactly what
// paho's does, and paho's decoder reads it back, for remaining lengths of
// one to three bytes and both QoS.
func TestAppendPublish(t *testing.T) {
	for _, c := range []struct {
		id      uint16
		qos     byte
		topic   string
		payload int
		gateway string
		seq     uint64
	}{
		{1, 1, "bastion/gw1/d1/t/temp", 100, "gw1", 1},
		{65535, 1, "bastion/gw1/d1/t", 0, "gw1", 18446744073709551615},
		{0, 0, "bastion/gw-0042/sensor.7/t/a/b/", 20, "gw-0042", 1234567},
		{300, 1, strings.Repeat("t", 200), 200, strings.Repeat("g", 64), 99},
		{7, 1, "bastion/gw1/d1/t/big", 20000, "gw1", 5},
		{8, 1, "bastion/gw1/d1/t/huge", 256 << 10, "gw1", 6},
	} {
		payload := bytes.Repeat([]byte{0xa5}, c.payload)
		prefix := []byte("earlier packets")
		got := appendPublish(append([]byte(nil), prefix...), c.id, c.qos, c.topic, payload, c.gateway, c.seq)
		want := append(append([]byte(nil), prefix...), pahoPublish(c.id, c.qos, c.topic, payload, c.gateway, c.seq)...)
		if !bytes.Equal(got, want) {
			t.Errorf("appendPublish(%d, %d, %q, %d bytes, %q, %d) (-paho +ours):\n%s", c.id, c.qos, c.topic, c.payload, c.gateway, c.seq, cmp.Diff(want, got))
			continue
		}
		cp, err := packets.ReadPacket(bytes.NewReader(got[len(prefix):]))
		if err != nil {
			t.Fatalf("paho cannot read our PUBLISH: %v", err)
		}
		p := cp.Content.(*packets.Publish)
		if p.Topic != c.topic || p.QoS != c.qos || !bytes.Equal(p.Payload, payload) || (c.qos > 0 && p.PacketID != c.id) {
			t.Errorf("paho read back topic %q qos %d id %d, %d bytes", p.Topic, p.QoS, p.PacketID, len(p.Payload))
		}
	}
}

// TestAppendPublishAllocs: appending to a buffer with room allocates nothing.
func TestAppendPublishAllocs(t *testing.T) {
	buf := make([]byte, 0, 4096)
	payload := make([]byte, 100)
	allocs := testing.AllocsPerRun(1000, func() {
		buf = appendPublish(buf[:0], 17, 1, "bastion/gw1/dev-17/t/sensors/temp", payload, "gw1", 123456789)
	})
	if allocs != 0 {
		t.Errorf("appendPublish: %.1f allocations, want 0", allocs)
	}
}

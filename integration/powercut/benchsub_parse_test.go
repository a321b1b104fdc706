package powercut

import (
	"bufio"
	"bytes"
	"fmt"
	"testing"

	"github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"
)

// TestBenchSubParse checks the benchmark subscriber's PUBLISH parsing
// against paho's encoder: with and without properties (the two user
// properties Bastion's link adds, as the cloud broker forwards them), QoS
// 0 and 1, payloads empty and long enough for a two-byte remaining
// length.
func TestBenchSubParse(t *testing.T) {
	for _, qos := range []byte{0, 1} {
		for _, props := range []*packets.Properties{{}, {User: []packets.User{{Key: "bastion-origin", Value: "gw1"}, {Key: "bastion-seq", Value: "123456"}}}} {
			for _, payload := range [][]byte{nil, bytes.Repeat([]byte{0xa5}, 100), bytes.Repeat([]byte{1}, 300)} {
				name := fmt.Sprintf("qos%d/props%d/payload%d", qos, len(props.User), len(payload))
				t.Run(name, func(t *testing.T) {
					p := &packets.Publish{Topic: "bastion/gw1/b0/t/n", QoS: qos, Payload: payload, Properties: props}
					if qos > 0 {
						p.PacketID = 0x1234
					}
					var wire bytes.Buffer
					if _, err := p.WriteTo(&wire); err != nil {
						t.Fatal(err)
					}
					typ, body, err := readPacket(bufio.NewReader(&wire), nil)
					if err != nil {
						t.Fatal(err)
					}
					id, got, err := parsePublish(typ, body)
					if err != nil {
						t.Fatal(err)
					}
					if id != p.PacketID {
						t.Errorf("packet id %#x, want %#x", id, p.PacketID)
					}
					if diff := cmp.Diff(payload, got, cmp.Comparer(bytes.Equal)); diff != "" {
						t.Errorf("payload (-want +got):\n%s", diff)
					}
				})
			}
		}
	}
	// Cut anywhere, a PUBLISH body is refused or parsed within its bounds, never a panic.
	p := &packets.Publish{Topic: "t", QoS: 1, PacketID: 1, Payload: []byte("x"), Properties: &packets.Properties{User: []packets.User{{Key: "k", Value: "v"}}}}
	var wire bytes.Buffer
	p.WriteTo(&wire)
	body := wire.Bytes()[2:]
	for n := range len(body) {
		if _, _, err := parsePublish(0x32, body[:n]); err == nil && n < len(body)-1 {
			t.Errorf("a PUBLISH body cut to %d of %d bytes parsed", n, len(body))
		}
	}
}

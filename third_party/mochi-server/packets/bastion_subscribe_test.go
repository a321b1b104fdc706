package packets

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestBastionSubscribeNoOptionsByte (Bastion patch (24)): an MQTT 5
// SUBSCRIBE whose last topic filter has no options byte is malformed, not
// a panic (upstream read buf[offset] past the end: a connected device could
// end the whole process with these 10 bytes, found by bridges/mqtt's
// FuzzDecodePacket).
func TestBastionSubscribeNoOptionsByte(t *testing.T) {
	// 82 08: SUBSCRIBE, 8 bytes: packet id 1, no properties, filter "a/b".
	body := []byte{0x00, 0x01, 0x00, 0x00, 0x03, 0x61, 0x2f, 0x62}
	pk := &Packet{ProtocolVersion: 5, FixedHeader: FixedHeader{Type: Subscribe, Qos: 1, Remaining: len(body)}}
	var err error
	require.NotPanics(t, func() { err = pk.SubscribeDecode(body) })
	require.ErrorIs(t, err, ErrMalformedQos)
}

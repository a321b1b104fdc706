package mqtt

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	paho "github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/mochi-mqtt/server/v2/packets"
)

// decodePacket decodes one whole packet as mochi's Client.ReadPacket does
// for a session of protocol version ver (CONNECT sets its own). ok is
// false when wire does not hold a whole packet (the server would wait for
// more bytes, or readFixedHeader refuses it: FuzzReadFixedHeader).
func decodePacket(wire []byte, ver byte) (pk packets.Packet, ok bool, err error) {
	if len(wire) < 2 {
		return pk, false, nil
	}
	pk.ProtocolVersion = ver
	if err := pk.FixedHeader.Decode(wire[0]); err != nil {
		return pk, true, err
	}
	r := bytes.NewReader(wire[1:])
	n, _, err := packets.DecodeLength(r)
	if err != nil || n > r.Len() {
		return pk, false, nil
	}
	pk.FixedHeader.Remaining = n
	body := wire[len(wire)-r.Len():][:n]
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Pubrel:
		err = pk.PubrelDecode(body)
	case packets.Pubcomp:
		err = pk.PubcompDecode(body)
	case packets.Subscribe:
		err = pk.SubscribeDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Unsubscribe:
		err = pk.UnsubscribeDecode(body)
	case packets.Unsuback:
		err = pk.UnsubackDecode(body)
	case packets.Pingreq, packets.Pingresp:
	case packets.Auth:
		err = pk.AuthDecode(body)
	default:
		err = fmt.Errorf("invalid packet type %d", pk.FixedHeader.Type)
	}
	return pk, true, err
}

// encodePacket is mochi's encoder for pk's type.
func encodePacket(pk *packets.Packet) ([]byte, error) {
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	case packets.Connack:
		err = pk.ConnackEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Pubrec:
		err = pk.PubrecEncode(&buf)
	case packets.Pubrel:
		err = pk.PubrelEncode(&buf)
	case packets.Pubcomp:
		err = pk.PubcompEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Suback:
		err = pk.SubackEncode(&buf)
	case packets.Unsubscribe:
		err = pk.UnsubscribeEncode(&buf)
	case packets.Unsuback:
		err = pk.UnsubackEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	case packets.Pingresp:
		err = pk.PingrespEncode(&buf)
	case packets.Auth:
		err = pk.AuthEncode(&buf)
	}
	return buf.Bytes(), err
}

// pahoPackets are the packets paho.golang's client writes (its packets
// package is the encoder paho.Client sends with), MQTT 5 with properties.
func pahoPackets(tb testing.TB) [][]byte {
	u8 := func(b byte) *byte { return &b }
	u16 := func(v uint16) *uint16 { return &v }
	u32 := func(v uint32) *uint32 { return &v }
	sid := 7
	cps := []*paho.ControlPacket{}
	add := func(t byte, fill func(cp *paho.ControlPacket)) {
		cp := paho.NewControlPacket(t)
		fill(cp)
		cps = append(cps, cp)
	}
	add(paho.CONNECT, func(cp *paho.ControlPacket) {
		c := cp.Content.(*paho.Connect)
		c.ClientID, c.KeepAlive, c.CleanStart = "dev-paho", 30, true
		c.Username, c.UsernameFlag, c.Password, c.PasswordFlag = "dev-paho", true, []byte("s3cret"), true
		c.WillFlag, c.WillTopic, c.WillMessage, c.WillQOS, c.WillRetain = true, "devices/dev-paho/status", []byte("offline"), 1, true
		c.WillProperties = &paho.Properties{WillDelayInterval: u32(5), ContentType: "text/plain"}
		c.Properties = &paho.Properties{SessionExpiryInterval: u32(3600), ReceiveMaximum: u16(10), MaximumPacketSize: u32(1 << 16),
			TopicAliasMaximum: u16(4), RequestProblemInfo: u8(1), User: []paho.User{{Key: "fw", Value: "2.0"}}}
	})
	add(paho.PUBLISH, func(cp *paho.ControlPacket) {
		p := cp.Content.(*paho.Publish)
		p.Topic, p.Payload, p.QoS, p.PacketID = "devices/dev-paho/t/temp", []byte(`{"t":20.25}`), 1, 1
		p.Properties = &paho.Properties{PayloadFormat: u8(1), MessageExpiry: u32(120), ContentType: "application/json",
			ResponseTopic: "devices/dev-paho/r", CorrelationData: []byte{1, 2, 3}, TopicAlias: u16(1), User: []paho.User{{Key: "unit", Value: "C"}}}
	})
	add(paho.PUBLISH, func(cp *paho.ControlPacket) {
		p := cp.Content.(*paho.Publish)
		p.Payload, p.QoS, p.PacketID, p.Retain = []byte("21.0"), 2, 2, true
		p.Properties = &paho.Properties{TopicAlias: u16(1)} // empty topic: the alias names it
	})
	add(paho.SUBSCRIBE, func(cp *paho.ControlPacket) {
		s := cp.Content.(*paho.Subscribe)
		s.PacketID = 3
		s.Subscriptions = []paho.SubOptions{{Topic: "devices/dev-paho/c/#", QoS: 1, NoLocal: true, RetainAsPublished: true, RetainHandling: 2}, {Topic: "$share/g/devices/+/t/#", QoS: 2}}
		s.Properties = &paho.Properties{SubscriptionIdentifier: &sid, User: []paho.User{{Key: "k", Value: "v"}}}
	})
	add(paho.UNSUBSCRIBE, func(cp *paho.ControlPacket) {
		u := cp.Content.(*paho.Unsubscribe)
		u.PacketID, u.Topics = 4, []string{"devices/dev-paho/c/#", "a/b"}
	})
	add(paho.PUBACK, func(cp *paho.ControlPacket) {
		a := cp.Content.(*paho.Puback)
		a.PacketID, a.ReasonCode = 9, 0x10
		a.Properties = &paho.Properties{ReasonString: "no matching subscribers"}
	})
	add(paho.PUBREC, func(cp *paho.ControlPacket) { cp.Content.(*paho.Pubrec).PacketID = 10 })
	add(paho.PUBREL, func(cp *paho.ControlPacket) { cp.Content.(*paho.Pubrel).PacketID = 10 })
	add(paho.PUBCOMP, func(cp *paho.ControlPacket) { cp.Content.(*paho.Pubcomp).PacketID = 10 })
	add(paho.PINGREQ, func(*paho.ControlPacket) {})
	add(paho.AUTH, func(cp *paho.ControlPacket) {
		a := cp.Content.(*paho.Auth)
		a.ReasonCode = 0x18
		a.Properties = &paho.Properties{AuthMethod: "SCRAM-SHA-256", AuthData: []byte("n,,n=dev,r=abc")}
	})
	add(paho.DISCONNECT, func(cp *paho.ControlPacket) {
		d := cp.Content.(*paho.Disconnect)
		d.ReasonCode = 0x04
		d.Properties = &paho.Properties{SessionExpiryInterval: u32(0), ReasonString: "bye"}
	})
	var out [][]byte
	for _, cp := range cps {
		var b bytes.Buffer
		if _, err := cp.WriteTo(&b); err != nil {
			tb.Fatalf("paho encode %s: %v", cp.PacketType(), err)
		}
		out = append(out, b.Bytes())
	}
	return out
}

// FuzzDecodePacket feeds whole MQTT packets, as any LAN peer can send them
// (CONNECT comes before any authentication), through mochi's decoders:
// ConnectDecode, PublishDecode, SubscribeDecode, Properties.Decode and the
// rest, for a 3.1.1 and an MQTT 5 session. Seeds are packets real clients
// sent: mosquitto_pub and mosquitto_sub 2.0 (3.1.1 and 5, with properties,
// Will, QoS 2) and a Mosquitto broker's answers (testdata/packets, made by
// capture.py there), and paho.golang's encoder (pahoPackets). Whatever the
// bytes, decoding must not panic; a decoded packet's HeldBytes (patch
// (17): what the server charges for holding it) covers its topic, payload
// and user properties, and is at most 32/5 of the packet (an empty user
// property: 5 bytes on the wire, 32 held); and if the server accepts it
// (accepted), mochi's encoder (which the server forwards PUBLISHes with)
// must encode it into bytes that decode to the same packet.
func FuzzDecodePacket(f *testing.F) {
	files, _ := filepath.Glob("testdata/packets/*.bin")
	if len(files) == 0 {
		f.Fatal("no seed packets in testdata/packets")
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, b := range pahoPackets(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, wire []byte) {
		for _, ver := range []byte{4, 5} {
			pk, whole, err := decodePacket(wire, ver)
			if !whole || err != nil {
				continue
			}
			checkHeld(t, &pk, wire)
			if !accepted(&pk) {
				continue // refused after decoding: never encoded from
			}
			// Encode a copy: the encoder may set fields (Remaining).
			// Response topic and correlation data are encoded only for
			// a receiver that asked for response information.
			// The length is the encoder's to set: a PINGREQ's encoder
			// writes the one it finds (mochi reads and drops the body of
			// a PINGREQ, which MQTT says has none).
			again := pk
			again.Mods.AllowResponseInfo = true
			again.FixedHeader.Remaining = 0
			enc, err := encodePacket(&again)
			if err != nil {
				continue // mochi refuses to encode it (too large for Mods.MaxSize)
			}
			got, whole, err := decodePacket(enc, pk.ProtocolVersion)
			if !whole || err != nil {
				t.Fatalf("v%d %x decoded, was encoded as %x, which does not decode: whole %v, %v", ver, wire, enc, whole, err)
			}
			if d := cmp.Diff(normalize(pk), normalize(got), cmpopts.EquateEmpty(), cmpopts.IgnoreFields(packets.Packet{}, "Mods")); d != "" {
				t.Fatalf("v%d %x: decode(encode(decode)) differs (-first +second):\n%s", ver, wire, d)
			}
		}
	})
}

// accepted is whether the server's check of a decoded packet (the
// Validate of its type) lets it through: only such a packet's fields are
// forwarded or answered (a topic alias up to the most MQTT allows).
func accepted(pk *packets.Packet) bool {
	var code packets.Code
	switch pk.FixedHeader.Type {
	case packets.Connect:
		code = pk.ConnectValidate()
	case packets.Publish:
		code = pk.PublishValidate(math.MaxUint16)
	case packets.Subscribe:
		code = pk.SubscribeValidate()
	case packets.Unsubscribe:
		code = pk.UnsubscribeValidate()
	case packets.Auth:
		code = pk.AuthValidate()
	default:
		return true
	}
	return code == packets.CodeSuccess
}

// checkHeld checks HeldBytes of pk, decoded from wire.
func checkHeld(t *testing.T, pk *packets.Packet, wire []byte) {
	t.Helper()
	held := pk.HeldBytes()
	min := len(pk.TopicName) + len(pk.Payload)
	for _, u := range pk.Properties.User {
		min += len(u.Key) + len(u.Val)
	}
	if held < min {
		t.Fatalf("%x: HeldBytes %d below the %d bytes of topic, payload and user properties it holds", wire, held, min)
	}
	if held*5 > 32*len(wire) {
		t.Fatalf("%x: HeldBytes %d is over 32/5 of the %d bytes on the wire", wire, held, len(wire))
	}
}

// normalize clears what mochi's encoder does not carry by design: the
// reserved bit, the remaining length (recomputed), and the reason code of
// an acknowledgement without properties unless it is an error (0x80 and
// up): upstream's encoder writes a success code such as 0x10 (no matching
// subscribers) only with properties after it, and patch (7) keeps that.
func normalize(pk packets.Packet) packets.Packet {
	pk.FixedHeader.Remaining = 0
	pk.ReservedBit = 0
	switch pk.FixedHeader.Type {
	case packets.Puback, packets.Pubrec, packets.Pubrel, packets.Pubcomp:
		if pk.ReasonCode < packets.ErrUnspecifiedError.Code && isEmptyProps(pk.Properties) {
			pk.ReasonCode = 0
		}
	}
	return pk
}

func isEmptyProps(p packets.Properties) bool {
	return cmp.Equal(p, packets.Properties{}, cmpopts.EquateEmpty())
}

package otacache

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// TestEncodeIntoMatchesGoCoap: the answers ServeDTLS encodes into its
// response cache (encodeInto, with the payload read from the body at an
// offset) are byte for byte what go-coap's udp coder encodes, for random
// tokens, options (some larger than a cache slot) and payloads, and an
// answer go-coap refuses is refused.
func TestEncodeIntoMatchesGoCoap(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	body := make([]byte, 5000)
	for i := range body {
		body[i] = byte(rng.Uint32())
	}
	c := &DTLSConn{cache: NewResponseCache(3)}
	ids := []message.OptionID{message.ETag, message.URIPath, message.ContentFormat, message.Block2, message.Size2, message.LocationPath, 2048, 65000}
	for i := range 2000 {
		m := message.Message{
			Token:     body[:rng.IntN(9)],
			Code:      codes.Code(rng.IntN(256)),
			MessageID: int32(rng.IntN(1 << 16)),
			Type:      message.Type(rng.IntN(4)),
		}
		for range rng.IntN(6) {
			vl := rng.IntN(20)
			if rng.IntN(50) == 0 {
				vl = 1500 + rng.IntN(800)
			}
			m.Options = m.Options.Add(message.Option{ID: ids[rng.IntN(len(ids))], Value: body[:vl]})
		}
		off, n := int64(rng.IntN(4000)), rng.IntN(1025)
		if i%5 == 0 {
			n = 0
		}
		want := m
		want.Payload = body[off : off+int64(n)]
		wbuf := make([]byte, 8000)
		wn, err := coder.DefaultCoder.Encode(want, wbuf)
		if err != nil {
			t.Fatal(err)
		}
		got, err := c.encodeInto(m, bytes.NewReader(body), off, n)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if diff := cmp.Diff(wbuf[:wn], got); diff != "" {
			t.Fatalf("message %d (-want +got):\n%s", i, diff)
		}
		c.cache.commit(uint16(i), got, time.Now())
	}
	for _, bad := range []message.Message{
		{MessageID: 1 << 16, Type: message.Acknowledgement},
		{MessageID: -1, Type: message.Acknowledgement},
		{MessageID: 1, Type: message.Acknowledgement, Token: make([]byte, 9)},
	} {
		if _, err := coder.DefaultCoder.Encode(bad, make([]byte, 100)); err == nil {
			t.Fatalf("go-coap encodes %+v", bad)
		}
		if _, err := c.encodeInto(bad, nil, 0, 0); err == nil {
			t.Errorf("%+v encoded", bad)
		}
	}
	// A body shorter than the block asked for fails the answer.
	if _, err := c.encodeInto(message.Message{Type: message.Acknowledgement}, bytes.NewReader(body[:10]), 5, 10); err == nil {
		t.Error("short body: no error")
	}
}

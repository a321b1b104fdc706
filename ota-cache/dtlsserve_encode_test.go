package otacache

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// TestEncodeIntoMatchesGoCoap: the answers ServeDTLS encodes into its
// response cache (encodeAnswer, with the payload read from the body at an
// offset) are byte for byte what go-coap's udp coder encodes, for random
// tokens, options (some larger than a cache slot) and payloads, and an
// answer go-coap refuses is refused.
func TestEncodeAnswerMatchesGoCoap(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	body := make([]byte, 5000)
	for i := range body {
		body[i] = byte(rng.Uint32())
	}
	var buf []byte
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
		got, err := encodeAnswer(buf[:0], m, bytes.NewReader(body), off, n)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if diff := cmp.Diff(wbuf[:wn], got); diff != "" {
			t.Fatalf("message %d (-want +got):\n%s", i, diff)
		}
		if i%3 == 0 {
			buf = got // reused, grown or not
		}
	}
	for _, bad := range []message.Message{
		{MessageID: 1 << 16, Type: message.Acknowledgement},
		{MessageID: -1, Type: message.Acknowledgement},
		{MessageID: 1, Type: message.Acknowledgement, Token: make([]byte, 9)},
	} {
		if _, err := coder.DefaultCoder.Encode(bad, make([]byte, 100)); err == nil {
			t.Fatalf("go-coap encodes %+v", bad)
		}
		if _, err := encodeAnswer(nil, bad, nil, 0, 0); err == nil {
			t.Errorf("%+v encoded", bad)
		}
	}
	// A body shorter than the block asked for fails the answer.
	if _, err := encodeAnswer(nil, message.Message{Type: message.Acknowledgement}, bytes.NewReader(body[:10]), 5, 10); err == nil {
		t.Error("short body: no error")
	}
}

// TestStableBodyRetransmission: the answer to a block of a verified image
// is kept as where its payload is (StableBody), and a retransmission gets
// the same bytes without the handler running again; once the image is
// dropped (unmapped), a retransmission is answered afresh by the handler.
// An answer with any other body is replayed from a copy, even after the
// handler's body changed.
func TestStableBodyRetransmission(t *testing.T) {
	data := make([]byte, 5000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	_, m := mappedTestFile(t, data)
	img := &blob{m: m, size: int64(len(data))}
	runs := 0
	mutable := []byte("mutable body")
	cfg := &DTLSServeConfig{BlockwiseSZX: blockwise.SZX1024, Errors: func(error) {},
		Handler: func(w *DTLSResponseWriter, r *pool.Message) {
			runs++
			if p, _ := r.Path(); p == "/m" {
				_ = w.SetResponse(codes.Content, message.TextPlain, bytes.NewReader(mutable))
				return
			}
			if m.data == nil {
				_ = w.SetResponse(codes.NotFound, message.TextPlain, nil)
				return
			}
			_ = w.SetResponse(codes.Content, message.AppOctets, img.coapBody())
		}}
	rc := &recordConn{}
	c := &DTLSConn{nc: rc, ctx: context.Background(), srv: &dtlsServer{cfg: cfg}, cache: NewResponseCache(4)}
	enc := func(mid int32, path string, block uint32) []byte {
		var ob [4]byte
		msg := message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: mid, Token: []byte{1, 2},
			Options: message.Options{{ID: message.URIPath, Value: []byte(path)}, {ID: message.Block2, Value: ob[:putUint(ob[:], block)]}}}
		buf := make([]byte, 100)
		n, err := coder.DefaultCoder.Encode(msg, buf)
		if err != nil {
			t.Fatal(err)
		}
		return buf[:n]
	}
	opt, _ := blockwise.EncodeBlockOption(blockwise.SZX1024, 2, true)
	c.handleDatagram(enc(7, "fw", opt), time.Now())
	c.handleDatagram(enc(7, "fw", opt), time.Now())
	if runs != 1 || len(rc.out) != 2 {
		t.Fatalf("handler ran %d times for a retransmission, %d answers sent; want 1 and 2", runs, len(rc.out))
	}
	if !bytes.Equal(rc.out[0], rc.out[1]) {
		t.Fatalf("retransmission answered with other bytes:\n%x\n%x", rc.out[0], rc.out[1])
	}
	got := message.Message{Options: make(message.Options, 0, 16)}
	if _, err := coder.DefaultCoder.Decode(rc.out[1], &got); err != nil || !bytes.Equal(got.Payload, data[2048:3072]) {
		t.Fatalf("replayed block 2: %v, payload is not the image's bytes 2048-3071", err)
	}
	if c.cache.slots[0].src == nil || len(c.cache.slots[0].raw) >= 1024 {
		t.Fatalf("the cache holds %d bytes and no body reference: a copy, not where the block is", len(c.cache.slots[0].raw))
	}

	if err := m.unmap(); err != nil {
		t.Fatal(err)
	}
	c.handleDatagram(enc(7, "fw", opt), time.Now())
	if runs != 2 || len(rc.out) != 3 {
		t.Fatalf("after the image was dropped: handler ran %d times, %d answers; want 2 and 3", runs, len(rc.out))
	}
	got = message.Message{Options: make(message.Options, 0, 16)}
	if _, err := coder.DefaultCoder.Decode(rc.out[2], &got); err != nil || got.Code != codes.NotFound {
		t.Fatalf("after the image was dropped the retransmission got %v (%v), want the handler's fresh 4.04", got.Code, err)
	}

	c.handleDatagram(enc(8, "m", 0), time.Now())
	copy(mutable, "MUTATED")
	c.handleDatagram(enc(8, "m", 0), time.Now())
	if runs != 3 || !bytes.Equal(rc.out[3], rc.out[4]) || !bytes.Contains(rc.out[4], []byte("mutable body")) {
		t.Fatalf("an ordinary body's answer was not replayed from a copy: runs %d\n%q\n%q", runs, rc.out[3], rc.out[4])
	}
}

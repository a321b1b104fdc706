package coap_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
)

// sendPost sends a confirmable POST path with payload and options.
func (d *rawDevice) sendPost(mid uint16, path string, payload []byte, opts ...message.Option) {
	d.t.Helper()
	m := message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: int32(mid), Token: tokenOf(mid), Payload: payload}
	buf := make([]byte, 256)
	var err error
	m.Options, _, err = m.Options.SetPath(buf, path)
	if err != nil {
		d.t.Fatal(err)
	}
	m.Options = append(m.Options, opts...)
	size, err := coder.DefaultCoder.Size(m)
	if err != nil {
		d.t.Fatal(err)
	}
	raw := make([]byte, size)
	if _, err := coder.DefaultCoder.Encode(m, raw); err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.dc.Write(raw); err != nil {
		d.t.Fatal(err)
	}
}

// tooLarge reads the answer to mid and checks it is 4.13 with Size1 limit.
func (d *rawDevice) tooLarge(what string, mid uint16, limit uint32) {
	d.t.Helper()
	buf := make([]byte, 2048)
	_ = d.dc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := d.dc.Read(buf)
	if err != nil {
		d.t.Fatalf("%s: no answer from the gateway: %v", what, err)
	}
	m := pool.NewMessage(context.Background())
	if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
		d.t.Fatalf("%s: answer does not decode: %v", what, err)
	}
	size1, err := m.Options().GetUint32(message.Size1)
	if m.MessageID() != int32(mid) || m.Type() != message.Acknowledgement || m.Code() != codes.RequestEntityTooLarge || err != nil || size1 != limit {
		d.t.Fatalf("%s: got message %d %v %v Size1 %d (%v), want the ACK of %d with 4.13 and Size1 %d",
			what, m.MessageID(), m.Type(), m.Code(), size1, err, mid, limit)
	}
}

func block1(t *testing.T, num int64, more bool) message.Option {
	t.Helper()
	v, err := blockwise.EncodeBlockOption(blockwise.SZX1024, num, more)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	n, _ := message.EncodeUint32(b, v)
	return message.Option{ID: message.Block1, Value: b[:n]}
}

func uintOpt(id message.OptionID, v uint32) message.Option {
	b := make([]byte, 4)
	n, _ := message.EncodeUint32(b, v)
	return message.Option{ID: id, Value: b[:n]}
}

// A body over the resource's limit (coap.max_payload for /t) is refused
// with 4.13 carrying that limit in Size1, and counted payload_too_large:
// a Block1 transfer at the first block that takes it past the limit, or
// at block 0 when the Size1 the device announced is over it, and a single
// datagram too large to be read, which was dropped without an answer.
// Before, blocks were reassembled up to 64 KiB before the handler said
// 4.13, and past 64 KiB the 4.13 carried Size1 65536.
func TestBodyOverLimitRefusedEarly(t *testing.T) {
	h, dev, addr := startObserveServerWith(t, coap.Config{}, nil)
	d := dialRaw(t, dev, addr)
	refused := func() float64 {
		return testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonTooLarge))
	}
	block := bytes.Repeat([]byte("b"), 1024)

	d.sendPost(1, "/t/x", block, block1(t, 0, true))
	d.expect("Block1 block 0 (1024 bytes, the limit)", 1, codes.Continue)
	d.sendPost(2, "/t/x", block, block1(t, 1, true))
	d.tooLarge("Block1 block 1 (2048 bytes)", 2, 1024)
	if got := refused(); got != 1 {
		t.Errorf("payload_too_large refusals %v, want 1", got)
	}

	d.sendPost(3, "/t/y", block, block1(t, 0, true), uintOpt(message.Size1, 4000))
	d.tooLarge("Block1 block 0 announcing Size1 4000", 3, 1024)

	d.sendPost(4, "/t/z", bytes.Repeat([]byte("d"), 2000))
	d.tooLarge("one datagram of 2000 bytes", 4, 1024)
	if got := refused(); got != 3 {
		t.Errorf("payload_too_large refusals %v, want 3", got)
	}

	// Within the limit, a transfer still goes through.
	d.sendPost(5, "/t/ok", block[:600], block1(t, 0, false))
	d.expect("Block1 of 600 bytes", 5, codes.Changed)
}

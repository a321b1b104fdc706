package gateway

// RFC 7252 §5.4.1 in the gateway's own CoAP server (otacache.ServeDTLS as
// bridges/coap runs it): a request with a critical option the gateway does
// not process is refused, not handled as if the option were absent. Beside
// TestWrongRequestsGetTheRight4xx (transports_test.go), with its helpers.

import (
	"fmt"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// rawCoAP writes hand-made CoAP messages on a real DTLS session, so a
// test controls every option and sees exactly what comes back.
type rawCoAP struct {
	t  *testing.T
	dc *piondtls.Conn
}

func (r *rawCoAP) send(m message.Message) {
	r.t.Helper()
	buf := make([]byte, 2048)
	n, err := coder.DefaultCoder.Encode(m, buf)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.dc.Write(buf[:n]); err != nil {
		r.t.Fatal(err)
	}
}

// recv is the next message from the gateway (fails after 5 s).
func (r *rawCoAP) recv() message.Message {
	r.t.Helper()
	buf := make([]byte, 2048)
	r.dc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := r.dc.Read(buf)
	if err != nil {
		r.t.Fatalf("no answer from the gateway: %v", err)
	}
	m := message.Message{Options: make(message.Options, 0, 8)}
	if _, err := coder.DefaultCoder.Decode(buf[:n], &m); err != nil {
		r.t.Fatalf("answer %x does not decode: %v", buf[:n], err)
	}
	m.Payload = append([]byte(nil), m.Payload...)
	return m
}

// telemetryWith is POST /t/{seg} with extra options (sorted for the encoder).
func telemetryWith(typ message.Type, mid int32, seg string, extra ...message.Option) message.Message {
	opts := message.Options{{ID: message.URIPath, Value: []byte("t")}, {ID: message.URIPath, Value: []byte(seg)}}
	for _, o := range extra {
		opts = opts.Add(o)
	}
	return message.Message{Type: typ, Code: codes.POST, MessageID: mid, Token: []byte{byte(mid)}, Options: opts, Payload: []byte("1")}
}

func TestUnrecognisedCriticalOptionsGetBadOption(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "options", "psk")
	dc, err := d.DialDTLS(ctx, g.coapAddr(d))
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	r := &rawCoAP{t: t, dc: dc}
	badBefore := g.refusals(hub.CoAP, hub.ReasonBadRequest)

	// Confirmable requests with a critical option nobody here processes:
	// 4.02 on the request's message ID, naming the option, and nothing
	// reaches the Sink.
	for i, tc := range []struct {
		name string
		opt  message.Option
	}{
		{"option 9 (OSCORE)", message.Option{ID: 9, Value: []byte{0x09}}},
		{"If-Match", message.Option{ID: message.IfMatch, Value: []byte{1}}},
		{"Uri-Query", message.Option{ID: message.URIQuery, Value: []byte("a=1")}},
		{"Proxy-Uri", message.Option{ID: message.ProxyURI, Value: []byte("coap://example.com/")}},
		{"Block1 of 4 bytes (over its 3-byte range)", message.Option{ID: message.Block1, Value: []byte{0, 0, 0, 8}}},
	} {
		mid := int32(100 + i)
		r.send(telemetryWith(message.Confirmable, mid, "x", tc.opt))
		got := r.recv()
		if got.Type != message.Acknowledgement || got.Code != codes.BadOption || got.MessageID != mid {
			t.Errorf("%s: got %v %v MID %d, want ACK 4.02 MID %d (%s)", tc.name, got.Type, got.Code, got.MessageID, mid, got.Payload)
		}
		if want := fmt.Sprintf("unrecognised critical option %d", tc.opt.ID); string(got.Payload) != want {
			t.Errorf("%s: diagnostic %q, want %q", tc.name, got.Payload, want)
		}
	}
	// The same confirmable request again (a retransmission) gets the same
	// answer from the response cache and is not counted twice.
	r.send(telemetryWith(message.Confirmable, 100, "x", message.Option{ID: 9, Value: []byte{0x09}}))
	if got := r.recv(); got.Code != codes.BadOption || got.MessageID != 100 || string(got.Payload) != "unrecognised critical option 9" {
		t.Errorf("retransmission: got %v MID %d %q, want 4.02 MID 100 naming option 9", got.Code, got.MessageID, got.Payload)
	}
	// A non-confirmable one is dropped: no answer, nothing queued. The
	// session's requests are handled in order, so when the confirmable
	// request after it is answered, the NON has been dealt with.
	r.send(telemetryWith(message.NonConfirmable, 200, "x", message.Option{ID: 9, Value: []byte{0x09}}))
	// Elective options nobody processes (2048: even, unassigned) and
	// Uri-Host (one origin, whatever its name) do not stop a request.
	r.send(telemetryWith(message.Confirmable, 201, "ok",
		message.Option{ID: message.URIHost, Value: []byte("gateway.local")}, message.Option{ID: 2048, Value: []byte{1}}))
	if got := r.recv(); got.Code != codes.Changed || got.MessageID != 201 {
		t.Fatalf("after the NON: got %v %v MID %d (%s), want the 2.04 of MID 201 first", got.Type, got.Code, got.MessageID, got.Payload)
	}
	var topics []string
	for _, m := range g.sink.messages() {
		topics = append(topics, m.Topic)
	}
	if want := "devices/" + d.ID + "/t/ok"; len(topics) != 1 || topics[0] != want {
		t.Errorf("sink got %q, want only %q", topics, want)
	}
	if n := g.refusals(hub.CoAP, hub.ReasonBadRequest) - badBefore; n != 6 {
		t.Errorf("bad_request refusals %v, want 6 (five CON, one NON)", n)
	}
	g.waitLog(t, "coap: request refused: unrecognised critical option", "device="+d.ID, "answer=4.02")
	g.waitLog(t, "coap: request refused: unrecognised critical option", "device="+d.ID, "non-confirmable")
}

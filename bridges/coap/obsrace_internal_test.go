package coap

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

type capW struct {
	body []byte
	opts []message.Option
}

func (c *capW) SetResponse(_ codes.Code, _ message.MediaType, d io.ReadSeeker, opts ...message.Option) error {
	if d != nil {
		c.body, _ = io.ReadAll(d)
	}
	c.opts = opts
	return nil
}

// A command delivered between the GET /c Observe's read of the last
// command (route) and its registration (answer) reaches the device neither
// in the registration response nor as a notification.
func TestAuditObserveRegistrationLosesCommand(t *testing.T) {
	s := testServer(t, hub.LocalSink{})
	dev := "dabc"
	topic := "devices/" + dev + "/c/x"
	ctx := context.Background()
	if err := s.hub.Deliver(ctx, bridges.Message{Device: dev, Topic: topic, Payload: []byte("X")}); err != nil {
		t.Fatal(err)
	}
	res := s.route(dev, request{code: codes.GET, path: "/c/x", observe: 0, format: -1})
	// The cloud's command Y arrives now (upstream downlink goroutine).
	notified := false
	if err := s.hub.Deliver(ctx, bridges.Message{Device: dev, Topic: topic, Payload: []byte("Y")}); err != nil {
		t.Fatal(err)
	}
	se := &session{device: dev}
	m := pool.NewMessage(ctx)
	m.SetToken(message.Token{1, 2})
	w := &capW{}
	func() {
		defer func() {
			if recover() != nil { // notify on the nil DTLSConn: Y would have been sent
				notified = true
			}
		}()
		s.answer(w, m, se, res)
	}()
	if string(w.body) != "Y" && !notified {
		t.Fatalf("registration response carries %q and Y was never notified: command Y lost", w.body)
	}
}

// Commands held behind a registration whose answer is being written,
// beyond maxHeld, are dropped oldest first and each counted
// observe_backlog, in a line or two (one per device per 10 s), not one
// line per command: the cloud sends commands at the rate it likes.
// Mutation that fails it: the line in session.notify back on s.log.
func TestObserveBacklogDoesNotFloodTheLog(t *testing.T) {
	s := testServer(t, hub.LocalSink{})
	lines := &LogLines{}
	s.log = slog.New(lines)
	se := &session{device: "dev1"}
	o := &observation{held: true}
	const n = 200
	for i := range n {
		if !se.notify(s, o, bridges.Message{Device: "dev1", Topic: "devices/dev1/c/x", Payload: []byte{byte(i)}}) {
			t.Fatalf("command %d not taken while the registration's answer is written", i)
		}
	}
	if len(o.queue) != maxHeld || o.queue[0].Payload[0] != n-maxHeld {
		t.Fatalf("%d held, the oldest %d; want the last %d", len(o.queue), o.queue[0].Payload[0], maxHeld)
	}
	if got := testutil.ToFloat64(s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonObserveBacklog)); got != n-maxHeld {
		t.Errorf("observe_backlog refusals %v, want %d", got, n-maxHeld)
	}
	const line = "coap: command notification dropped"
	if got := lines.Count(line); got < 1 || got > 2 {
		t.Errorf("%d log lines for %d dropped notifications, want 1 or 2 (one per 10 s)", got, n-maxHeld)
	}
	for _, a := range lines.Attrs(line) {
		if a["device"] != "dev1" {
			t.Errorf("log line about device %q, want dev1", a["device"])
		}
	}
}

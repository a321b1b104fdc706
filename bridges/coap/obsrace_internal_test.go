package coap

import (
	"context"
	"io"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"

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

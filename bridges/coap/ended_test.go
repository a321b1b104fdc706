package coap_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/pki"
)

// countSink takes every message and counts them.
type countSink struct{ n atomic.Int64 }

func (s *countSink) Accept(context.Context, bridges.Message) error {
	s.n.Add(1)
	return nil
}

// A session that a revocation or the certificate sweep ended has no
// request served between its end and its close (on a goroutine of its
// own, later): it is answered 4.01, counted under the reason the session
// ended for, and reaches neither the Sink nor the hub (which the
// revocation told to forget the device). The close is held back (the
// close hook) until the request was answered. Before, the request was
// served as if the session lived.
func TestEndedSessionRefusesRequests(t *testing.T) {
	for _, tc := range []struct {
		name   string
		reason string
		end    func(r *certRig, serial string)
	}{
		{"device revoked", hub.ReasonRevoked, func(r *certRig, _ string) { r.ca.Revocations().RevokeDevice("dev-a") }},
		{"serial revoked (sweep)", hub.ReasonRevoked, func(r *certRig, serial string) { r.ca.Revocations().RevokeSerial(serial) }},
		{"certificate expired (sweep)", hub.ReasonExpired, func(r *certRig, _ string) { r.clk.Set(2 * time.Hour) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _ := newCertRigWith(t, func(ci *caIdentity) bridges.Identity { return &sweptIdentity{caIdentity: ci} }, "")
			entered, release := make(chan struct{}), make(chan struct{})
			var once, released sync.Once
			coap.SetCloseHook(r.s, func() {
				once.Do(func() { close(entered) })
				<-release
			})
			t.Cleanup(func() { released.Do(func() { close(release) }) })
			d, leaf := r.device(t, "dev-a")
			c := open(t, d, r.certAddr)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if res, err := c.Publish(ctx, "x", []byte("1")); err != nil || res.Code != codes.Changed {
				t.Fatalf("telemetry before the end: %v, %v; want 2.04", res.Code, err)
			}

			tc.end(r, pki.Serial(leaf))
			select {
			case <-entered:
			case <-time.After(10 * time.Second):
				t.Fatal("the session was not ended")
			}
			res, err := c.Publish(ctx, "x", []byte("2"))
			if err != nil || res.Code != codes.Unauthorized {
				t.Errorf("telemetry after the end, before the close: %v, %v; want 4.01", res.Code, err)
			}
			if n := r.sink.n.Load(); n != 1 {
				t.Errorf("%d messages reached the Sink, want 1 (the one before the end)", n)
			}
			if got := r.refusals(tc.reason); got != 2 {
				t.Errorf("%s refusals %v, want 2 (the session's end and its request)", tc.reason, got)
			}
			r.logged(t, "coap: request refused: the session was ended", map[string]string{"device": "dev-a", "reason": tc.reason, "path": "/t/x"})

			released.Do(func() { close(release) })
			endedWithin(t, c, tc.name)
		})
	}
}

package coap_test

import (
	"sync/atomic"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/mux"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// slowStatusStore is a firmware cache whose status reports wait for a
// store that does not answer until release is closed.
type slowStatusStore struct {
	release chan struct{}
	waiting atomic.Int32
	most    atomic.Int32
}

func (f *slowStatusStore) ServeCoAP(w mux.ResponseWriter, _ *mux.Message, _ string) {
	_ = w.SetResponse(codes.NotFound, message.TextPlain, nil)
}

func (f *slowStatusStore) ServeCoAPStatus(w mux.ResponseWriter, _ *mux.Message, _ string) {
	n := f.waiting.Add(1)
	for m := f.most.Load(); n > m && !f.most.CompareAndSwap(m, n); m = f.most.Load() {
	}
	<-f.release // the store's Put
	f.waiting.Add(-1)
	_ = w.SetResponse(codes.Changed, message.TextPlain, nil)
}

func (f *slowStatusStore) Offer(string) (otacache.Offer, bool) { return otacache.Offer{}, false }

// A session answered on the listener's read loop hands a request that may
// wait for the store (POST /fw-status, EST) to a goroutine of its own, at
// most 8 at once: a device pipelining 40 status reports while the store
// hangs gets 8 waiting and 5.03 with Max-Age for the other 32 (counted
// busy); once the store answers, the 8 are answered 2.04. Before, each of
// the 40 parked a goroutine, and thousands could.
func TestBlockingRequestsBoundedPerSession(t *testing.T) {
	fw := &slowStatusStore{release: make(chan struct{})}
	sink := holdSink{held: make(chan heldMessage, 1)}
	var _ bridges.NotifySink = sink // inline sessions need one
	s, pskDev, _, pskAddr, _, _ := startWith(t, &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}, sink,
		coap.Config{Firmware: fw}, nil, 0)
	released := false
	t.Cleanup(func() { // before the server's stop, which waits for them
		if !released {
			close(fw.release)
		}
	})
	d := dialRaw(t, pskDev, pskAddr)
	const sent = 40
	for i := range sent {
		d.send(uint16(1000+i), codes.POST, "/fw-status", []byte(`{"state":"downloading"}`))
	}
	busy := 0
	for range sent - 8 {
		a := d.next()
		if a.typ != message.Acknowledgement || a.code != codes.ServiceUnavailable || a.maxAge != 5 {
			t.Fatalf("answer %d while the store hangs: %v %v Max-Age %d, want 5.03 with Max-Age 5", busy, a.typ, a.code, a.maxAge)
		}
		busy++
	}
	if n := testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonBusy)); n != sent-8 {
		t.Errorf("busy refusals %v, want %d", n, sent-8)
	}
	if n := fw.most.Load(); n > 8 {
		t.Errorf("%d status reports waited for the store at once, want at most 8", n)
	}
	close(fw.release)
	released = true
	for range 8 {
		if a := d.next(); a.code != codes.Changed {
			t.Fatalf("after the store answered: %v, want 2.04", a.code)
		}
	}
}

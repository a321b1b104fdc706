package coap

import (
	"context"
	"fmt"
	"sync"

	"github.com/plgd-dev/go-coap/v3/message/pool"

	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// durableAnswer is the answer to telemetry the Sink admitted but has not
// yet made durable (a confirmable request; bridges.NotifySink). The device
// is answered exactly once, by whichever comes first:
//
//   - done, the Sink's callback after the group commit's fsync (2.04, or
//     the error's answer: 5.03 with Max-Age for a full queue), on the Sink's
//     goroutine; or
//   - timeout, when the request's shared deadline (hub.SharedDeadline, the
//     per-session acceptTimeout bound) ends first: 5.03 with Max-Age, the
//     answer a timed-out Accept gets. done coming later then does nothing.
//
// No goroutine waits per request: the deadline is a context.AfterFunc on
// the context every request of that second shares (a goroutine starts only
// if it fires), and the answer is written by the callback itself. Writing
// a DTLS record from the Sink's goroutine is one encryption and one UDP
// datagram, which never waits for the device (UDP has no flow control, so
// a device that stops reading cannot stall the queue's writer as a TCP
// peer could stall MQTT's; the listener's read loop writes inline answers
// the same way).
//
// The hand-over with the handler (handOver) is the delicate part: done may
// run before the handler has deferred its answer (a quick fsync, even
// before TelemetryNotify returned), while it defers, or long after. mu
// orders them: whoever settles first decides the answer, and the request
// and its deferred answer are used only by the one that settled, and only
// until Done (which releases both: otacache.DTLSDeferred).
type durableAnswer struct {
	s             *Server
	device, topic string
	ctx           context.Context // the wait's bound (hub.SharedDeadline)

	mu      sync.Mutex
	settled bool  // done or timeout has claimed the answer
	err     error // done's outcome when it came before handOver
	// Set by handOver; cleared by whoever settles after it, which then
	// owns them until d.Done.
	d    *otacache.DTLSDeferred
	m    *pool.Message
	se   *session
	stop func() bool // the deadline's AfterFunc
}

// handOver is the handler's side, right after the Sink said the message is
// pending: if done already came, the answer is given now, on w; otherwise
// the answer is deferred (w.Defer) and left to done or the deadline.
func (a *durableAnswer) handOver(w *otacache.DTLSResponseWriter, m *pool.Message, se *session) {
	s := a.s
	a.mu.Lock()
	if a.settled {
		err := a.err
		a.mu.Unlock()
		s.answer(w, m, se, s.telemetryAnswer(a.device, a.topic, err))
		return
	}
	// Deferred under mu: done, which now waits for mu, finds d set. The
	// handler still returns before anything is sent: the deferred answer
	// completes only once the handler has returned (DTLSDeferred).
	a.d, a.m, a.se = w.Defer(), m, se
	s.bg.Add(1) // Run waits for the answer, as it waited for the goroutine that gave it
	// If ctx has already ended, timeout starts now and waits for mu.
	a.stop = context.AfterFunc(a.ctx, a.timeout)
	a.mu.Unlock()
}

// done is the Sink's callback (bridges.NotifySink): it runs once, on the
// Sink's goroutine, after the message is durable (err nil) or failed. It
// never blocks (see durableAnswer).
func (a *durableAnswer) done(err error) {
	a.mu.Lock()
	if a.settled {
		a.mu.Unlock() // the deadline answered; nothing here is ours any more
		return
	}
	a.settled = true
	d := a.d
	if d == nil {
		a.err = err // before handOver: the handler answers
		a.mu.Unlock()
		return
	}
	m, se, stop := a.take()
	a.mu.Unlock()
	stop()
	a.finish(d, m, se, err)
}

// timeout runs (on a goroutine of context.AfterFunc's) when the request's
// deadline ends before done came.
func (a *durableAnswer) timeout() {
	a.mu.Lock()
	if a.settled {
		a.mu.Unlock()
		return
	}
	a.settled = true
	d := a.d
	m, se, _ := a.take()
	a.mu.Unlock()
	// The message may still become durable (and then be delivered): at
	// least once, as when Accept times out.
	a.finish(d, m, se, fmt.Errorf("telemetry from %s on %s: waiting for the disk: %w", a.device, a.topic, a.ctx.Err()))
}

// take hands the deferred request to the caller, who settled; mu is held.
func (a *durableAnswer) take() (*pool.Message, *session, func() bool) {
	m, se, stop := a.m, a.se, a.stop
	a.d, a.m, a.se, a.stop = nil, nil, nil, nil
	return m, se, stop
}

// finish sends the deferred answer for outcome err and releases the
// request (d.Done); neither d nor m may be used after it.
func (a *durableAnswer) finish(d *otacache.DTLSDeferred, m *pool.Message, se *session, err error) {
	s := a.s
	s.answer(d, m, se, s.telemetryAnswer(a.device, a.topic, err))
	d.Done()
	s.bg.Done()
}

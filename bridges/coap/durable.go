package coap

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/plgd-dev/go-coap/v3/message/pool"

	"github.com/bastion-iot/bastion/bridges/hub"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// durableAnswer is the answer to telemetry the Sink admitted but has not
// yet made durable (a confirmable request; bridges.NotifySink). The device
// is answered exactly once, by whichever comes first:
//
//   - done, the Sink's callback after the group commit's fsync (2.04, or
//     the error's answer: 5.03 with Max-Age for a full queue, 5.00 for a
//     disk error), on the Sink's goroutine; or
//   - timeout, when the request's shared deadline (hub.SharedDeadline, the
//     per-session acceptTimeout bound) ends first: 5.03 with Max-Age, the
//     answer a timed-out Accept gets. done coming later then does nothing.
//
// No goroutine waits per request, and no timer or context is made per
// request: every answer waiting under the same shared deadline context is
// on that context's deadlineWatch, one context.AfterFunc per context (per
// second), whose one goroutine answers what is still waiting when the
// deadline ends. The answer is written by the callback itself. Writing a
// DTLS record from the Sink's goroutine is one encryption and one UDP
// datagram, which never waits for the device (UDP has no flow control, so
// a device that stops reading cannot stall the queue's writer as a TCP
// peer could stall MQTT's; the listener's read loop writes inline answers
// the same way), nor for room in the listener's socket: a datagram it has
// no room for is dropped (pion-dtls patch (52), Server.writeDropped) and
// the device's retransmission is answered from the response cache. The
// queue's writer waiting here would hold up every commit of every
// transport.
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
	d  *otacache.DTLSDeferred
	m  *pool.Message
	se *session
	w  *deadlineWatch // the deadline it waits on (nil: none)

	// Links in w's list, under w.mu (frozen once w has fired).
	prev, next *durableAnswer
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
		s.answer(w, m, se, a.outcome(err))
		return
	}
	if a.ctx.Done() != nil { // QoS 0 has no deadline
		a.w = s.watches.of(s, a.ctx)
		if !a.w.add(a) {
			// The deadline has already passed: answered now, as then.
			a.settled, a.w = true, nil
			a.mu.Unlock()
			s.answer(w, m, se, a.outcome(a.timeoutErr()))
			return
		}
	}
	// Deferred under mu: done, and the deadline's timeout, now wait for mu
	// and find d set. The handler still returns before anything is sent:
	// the deferred answer completes only once the handler has returned
	// (DTLSDeferred).
	a.d, a.m, a.se = w.Defer(), m, se
	s.bg.Add(1) // Run waits for the answer, as it waited for the goroutine that gave it
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
	m, se, w := a.take()
	a.mu.Unlock()
	if w != nil {
		w.remove(a)
	}
	a.finish(d, m, se, err)
}

// timeout is the deadline's side (deadlineWatch.fire): the deadline ended
// before done came.
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
	a.finish(d, m, se, a.timeoutErr())
}

func (a *durableAnswer) timeoutErr() error {
	return fmt.Errorf("telemetry from %s on %s: waiting for the disk: %w", a.device, a.topic, a.ctx.Err())
}

// take hands the deferred request to the caller, who settled; mu is held.
func (a *durableAnswer) take() (*pool.Message, *session, *deadlineWatch) {
	m, se, w := a.m, a.se, a.w
	a.d, a.m, a.se, a.w = nil, nil, nil, nil
	return m, se, w
}

// finish sends the deferred answer for outcome err and releases the
// request (d.Done); neither d nor m may be used after it.
func (a *durableAnswer) finish(d *otacache.DTLSDeferred, m *pool.Message, se *session, err error) {
	s := a.s
	s.answer(d, m, se, a.outcome(err))
	d.Done()
	s.bg.Done()
}

// outcome is the answer for the settled outcome err. The hub counted the
// message as accepted when the Sink admitted it, so a failure here (the
// Sink's, or the deadline's) is a refusal no one has counted yet: it is
// counted here, once, since only the one that settled gets here.
func (a *durableAnswer) outcome(err error) response {
	if err != nil {
		a.s.hub.NotDurable(hub.CoAP, a.device, err)
	}
	return a.s.telemetryAnswer(a.device, a.topic, err)
}

// deadlineWatch holds the answers waiting under one shared deadline
// context and answers those still waiting when it ends (fire, from the
// context's one AfterFunc). Registering and removing an answer is a list
// operation under mu: no allocation, no timer, no context per request.
type deadlineWatch struct {
	s     *Server
	ctx   context.Context
	stop  func() bool // the AfterFunc's; set under Server.watches.mu
	mu    sync.Mutex
	head  *durableAnswer
	fired bool // the list was handed to fire; links are frozen
}

// add puts a on the list, or reports false if the deadline has ended.
func (w *deadlineWatch) add(a *durableAnswer) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fired {
		return false
	}
	a.next = w.head
	if w.head != nil {
		w.head.prev = a
	}
	w.head = a
	return true
}

// remove takes a, which done settled, off the list, unless fire already
// has the list (then fire finds it settled).
func (w *deadlineWatch) remove(a *durableAnswer) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fired {
		return
	}
	if a.prev != nil {
		a.prev.next = a.next
	} else {
		w.head = a.next
	}
	if a.next != nil {
		a.next.prev = a.prev
	}
	a.prev, a.next = nil, nil
}

// fire runs when the deadline ends: every answer still on the list gets
// the timeout's answer, on this one goroutine.
func (w *deadlineWatch) fire() {
	s := w.s
	s.watches.forget(w)
	w.mu.Lock()
	w.fired = true
	a := w.head
	w.head = nil
	if a != nil {
		// The answers on the list hold counts of bg, so it is above zero
		// even if Run already waits.
		s.bg.Add(1)
	}
	w.mu.Unlock()
	if a == nil {
		return
	}
	defer s.bg.Done()
	for a != nil {
		next := a.next // frozen: remove leaves a fired list alone
		a.timeout()
		a = next
	}
}

// deadlineWatches finds the watch of a shared deadline context: the
// current one in an atomic load, a new one (and its AfterFunc) once per
// context.
type deadlineWatches struct {
	cur  atomic.Pointer[deadlineWatch]
	mu   sync.Mutex
	live map[*deadlineWatch]struct{} // not fired yet; Run stops them at the end
}

func (ws *deadlineWatches) of(s *Server, ctx context.Context) *deadlineWatch {
	if w := ws.cur.Load(); w != nil && w.ctx == ctx {
		return w
	}
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if w := ws.cur.Load(); w != nil && w.ctx == ctx {
		return w
	}
	w := &deadlineWatch{s: s, ctx: ctx}
	if ws.live == nil {
		ws.live = map[*deadlineWatch]struct{}{}
	}
	ws.live[w] = struct{}{}
	// If ctx has already ended, fire starts at once and finds w.
	w.stop = context.AfterFunc(ctx, w.fire)
	ws.cur.Store(w)
	return w
}

func (ws *deadlineWatches) forget(w *deadlineWatch) {
	ws.mu.Lock()
	delete(ws.live, w)
	ws.mu.Unlock()
}

// stopAll stops the AfterFuncs of the watches that have not fired (Run,
// once no answer waits: their lists are empty), so that none starts a
// goroutine after Run returned.
func (ws *deadlineWatches) stopAll() {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	for w := range ws.live {
		w.stop()
	}
	ws.live = nil
	ws.cur.Store(nil)
}

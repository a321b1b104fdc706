package coap_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// rawDevice is a device's DTLS session driven datagram by datagram, so a
// test can have many confirmable requests outstanding at once (go-coap's
// client sends one at a time) and see every answer the gateway sends,
// duplicates included.
type rawDevice struct {
	t  *testing.T
	dc *piondtls.Conn
}

func dialRaw(t *testing.T, d *devicesim.Device, addr string) *rawDevice {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dc, err := d.DialDTLS(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dc.Close() })
	return &rawDevice{t: t, dc: dc}
}

// send sends a confirmable request with message ID mid and a token made
// from it.
func (d *rawDevice) send(mid uint16, code codes.Code, path string, payload []byte) {
	d.t.Helper()
	m := pool.NewMessage(context.Background())
	m.SetCode(code)
	m.SetType(message.Confirmable)
	m.SetMessageID(int32(mid))
	m.SetToken(tokenOf(mid))
	if err := m.SetPath(path); err != nil {
		d.t.Fatal(err)
	}
	if payload != nil {
		m.SetContentFormat(message.AppOctets)
		m.SetBody(strings.NewReader(string(payload)))
	}
	raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.dc.Write(raw); err != nil {
		d.t.Fatal(err)
	}
}

func tokenOf(mid uint16) message.Token { return message.Token{'t', byte(mid >> 8), byte(mid)} }

// rawAnswer is one datagram the gateway sent.
type rawAnswer struct {
	mid    uint16
	typ    message.Type
	code   codes.Code
	token  string
	maxAge uint32 // 0: none
}

// next reads the next datagram (10 s at most).
func (d *rawDevice) next() rawAnswer {
	d.t.Helper()
	buf := make([]byte, 2048)
	_ = d.dc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := d.dc.Read(buf)
	if err != nil {
		d.t.Fatalf("no answer from the gateway: %v", err)
	}
	m := pool.NewMessage(context.Background())
	if _, err := m.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
		d.t.Fatalf("answer does not decode: %v", err)
	}
	a := rawAnswer{mid: uint16(m.MessageID()), typ: m.Type(), code: m.Code(), token: string(m.Token())}
	if v, err := m.Options().GetUint32(message.MaxAge); err == nil {
		a.maxAge = v
	}
	return a
}

// expect reads the next datagram and checks that it answers mid with code.
func (d *rawDevice) expect(what string, mid uint16, code codes.Code) rawAnswer {
	d.t.Helper()
	a := d.next()
	if a.mid != mid || a.typ != message.Acknowledgement || a.code != code || a.token != string(tokenOf(mid)) {
		d.t.Fatalf("%s: got message %d %v %v token %q, want the ACK of %d with %v token %q",
			what, a.mid, a.typ, a.code, a.token, mid, code, tokenOf(mid))
	}
	return a
}

// syncGate is a queue.Options.Sync that, once armed, holds every fsync
// until released, and fails them while fail is set.
type syncGate struct {
	armed   atomic.Bool
	fail    atomic.Bool
	entered chan struct{}
	gate    chan struct{}
	once    sync.Once
}

func newSyncGate() *syncGate {
	return &syncGate{entered: make(chan struct{}, 1), gate: make(chan struct{})}
}

func (g *syncGate) sync(f *os.File) error {
	if g.armed.Load() {
		select {
		case g.entered <- struct{}{}:
		default:
		}
		<-g.gate
	}
	if g.fail.Load() {
		return errors.New("EIO from the test")
	}
	return f.Sync()
}

func (g *syncGate) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-g.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the queue's writer never reached its fsync")
	}
}

func (g *syncGate) release() { g.once.Do(func() { close(g.gate) }) }

// openQueue opens a durable queue whose fsyncs go through g; it is closed
// (with g released) after the test's server has stopped.
func openQueue(t *testing.T, g *syncGate, opts queue.Options) *queue.Queue {
	t.Helper()
	opts.Sync = g.sync
	q, err := queue.Open(t.TempDir(), opts, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		g.release()
		if err := q.Close(); err != nil && !g.fail.Load() {
			t.Errorf("close queue: %v", err)
		}
	})
	return q
}

// Confirmable telemetry waiting for the durable queue's fsync costs no
// goroutine per request: with the fsync held and 64 requests of one
// session outstanding (the session reads on: a GET sent after them is
// answered first, so none of them was answered before its fsync), the
// process has about as many goroutines as before them (the old code parked
// one per request). Released, all 65 are answered 2.04, once each, in the
// order they were sent.
func TestDurableAnswersWithoutGoroutinePerRequest(t *testing.T) {
	const n = 64
	g := newSyncGate()
	q := openQueue(t, g, queue.Options{})
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _ := startSessionsWithSink(t, id, q)
	c := dialRaw(t, dev, addr)
	c.send(900, codes.GET, "/.well-known/core", nil)
	c.expect("warm-up GET", 900, codes.Content)

	g.armed.Store(true)
	c.send(1, codes.POST, "/t/first", []byte("x"))
	g.waitEntered(t) // the writer holds message 1's fsync; the rest gather behind it
	g0 := runtime.NumGoroutine()
	for i := range n {
		c.send(uint16(2+i), codes.POST, fmt.Sprintf("/t/m%d", i), []byte("x"))
	}
	c.send(901, codes.GET, "/.well-known/core", nil)
	c.expect("GET sent after the held telemetry", 901, codes.Content)
	g1 := runtime.NumGoroutine()
	if g1-g0 > n/4 {
		t.Errorf("goroutines: %d with the first fsync held, %d with %d more requests waiting for it: one per request?", g0, g1, n)
	}
	g.release()
	for i := range n + 1 {
		c.expect(fmt.Sprintf("telemetry %d after the fsync", i), uint16(1+i), codes.Changed)
	}
	// No duplicate follows: the next datagram answers the next request.
	c.send(902, codes.GET, "/.well-known/core", nil)
	c.expect("GET after the telemetry answers", 902, codes.Content)
}

// The deadline (acceptTimeout) ends before the Sink's callback: the device
// gets 5.03 with Max-Age once, and the callback coming later sends
// nothing and touches nothing (the deferred request and its writer were
// released with the 5.03 and are reused by the next requests, which are
// answered intact). A retransmission gets the 5.03 again, from the cache.
func TestDurableAnswerTimeoutAnswersOnce(t *testing.T) {
	sink := holdSink{held: make(chan heldMessage, 4)}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _, _ := startStoppable(t, id, sink, 300*time.Millisecond)
	c := dialRaw(t, dev, addr)

	c.send(1, codes.POST, "/t/late", []byte("x"))
	late := sink.next(t)
	start := time.Now()
	a := c.expect("telemetry whose callback is late", 1, codes.ServiceUnavailable)
	if a.maxAge != 30 {
		t.Errorf("5.03 Max-Age %d, want 30 (RetryAfter)", a.maxAge)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("5.03 after %v, want within the 300 ms + 1 s bound", waited)
	}
	late.done(nil) // as the queue's writer would, after the deadline

	c.send(2, codes.GET, "/.well-known/core", nil)
	c.expect("GET after the late callback", 2, codes.Content)
	c.send(3, codes.POST, "/t/next", []byte("x"))
	sink.next(t).done(nil)
	c.expect("telemetry made durable in time", 3, codes.Changed)
	c.send(1, codes.POST, "/t/late", []byte("x"))
	c.expect("retransmission of the timed-out request", 1, codes.ServiceUnavailable)
}

// Many requests wait under the same deadline; the callbacks of some come
// in time, in any order (taken off the deadline's list from its head,
// middle and tail), the rest after the deadline: every request is answered
// exactly once, 2.04 for the first kind and 5.03 for the second, and the
// late callbacks send nothing.
func TestDurableAnswersTimeoutManyOnce(t *testing.T) {
	const n = 12
	sink := holdSink{held: make(chan heldMessage, n)}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _, _ := startStoppable(t, id, sink, 300*time.Millisecond)
	c := dialRaw(t, dev, addr)
	held := map[string]heldMessage{}
	for i := range n {
		c.send(uint16(1+i), codes.POST, fmt.Sprintf("/t/m%d", i), []byte("x"))
		h := sink.next(t)
		held[h.m.Topic] = h
	}
	inTime := []int{n - 1, 0, 5, 6, 3} // head (last added), tail, middle, neighbours
	for _, i := range inTime {
		held[fmt.Sprintf("devices/dev-psk/t/m%d", i)].done(nil)
	}
	want := map[uint16]codes.Code{}
	for i := range n {
		want[uint16(1+i)] = codes.ServiceUnavailable
	}
	for _, i := range inTime {
		want[uint16(1+i)] = codes.Changed
	}
	got := map[uint16]codes.Code{}
	for range n {
		a := c.next()
		if _, dup := got[a.mid]; dup || a.token != string(tokenOf(a.mid)) {
			t.Fatalf("answer to message %d (token %q) again, or with a wrong token; so far %v", a.mid, a.token, got)
		}
		got[a.mid] = a.code
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("answers by message ID (-want +got):\n%s", diff)
	}
	for _, h := range held {
		h.done(nil) // all late now, or called already: nothing more is sent
	}
	c.send(100, codes.GET, "/.well-known/core", nil)
	c.expect("GET after the late callbacks", 100, codes.Content)
}

// The Sink's callback may come before the handler has deferred its answer
// (a quick fsync, here before AcceptNotify even returns): the answer is
// given once, at once, and is 2.04.
func TestDurableAnswerCallbackBeforeHandOver(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _ := startSessionsWithSink(t, id, quickSink{})
	c := dialRaw(t, dev, addr)
	for mid := uint16(1); mid <= 20; mid++ {
		c.send(mid, codes.POST, "/t/quick", []byte("x"))
		c.expect("telemetry reported durable before its handler deferred", mid, codes.Changed)
	}
}

// quickSink reports every QoS 1 message durable from inside AcceptNotify.
type quickSink struct{}

func (quickSink) Accept(context.Context, bridges.Message) error { return nil }

func (quickSink) AcceptAsync(context.Context, bridges.Message) (<-chan error, error) { return nil, nil }

func (quickSink) AcceptNotify(_ context.Context, m bridges.Message, done func(error)) (bool, error) {
	if m.QoS == 0 {
		return false, nil
	}
	done(nil)
	return true, nil
}

// A durable queue that is full refuses at once: 5.03 with Max-Age. A
// failed fsync reaches the device as 5.00 through the callback, and the
// device is never told 2.04 for it. Each refusal is counted once, with its
// reason (queue_full, disk_error), for the transport and the device.
func TestDurableQueueFullAndFailedFsync(t *testing.T) {
	g := newSyncGate()
	q := openQueue(t, g, queue.Options{MaxBytes: 16 << 10})
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, dev, _, addr, _ := startSessionsWithSink(t, id, q)
	c := dialRaw(t, dev, addr)
	payload := make([]byte, 1000)
	mid := uint16(1)
	for ; ; mid++ {
		if mid > 100 {
			t.Fatal("100 messages of 1000 bytes taken by a queue of 16 KiB")
		}
		c.send(mid, codes.POST, "/t/fill", payload)
		a := c.next()
		if a.mid != mid || a.token != string(tokenOf(mid)) {
			t.Fatalf("answer to message %d (token %q), want %d", a.mid, a.token, mid)
		}
		if a.code == codes.Changed {
			continue
		}
		if a.code != codes.ServiceUnavailable || a.maxAge != 30 {
			t.Fatalf("full queue: %v Max-Age %d, want 5.03 Max-Age 30", a.code, a.maxAge)
		}
		break
	}
	if mid < 5 {
		t.Fatalf("refused as full after %d messages", mid-1)
	}
	checkRefusals(t, coap.HubOf(s), "dev-psk", hub.ReasonQueueFull, int(mid-1))

	// A second queue, whose next fsync fails.
	g2 := newSyncGate()
	q2 := openQueue(t, g2, queue.Options{})
	s2, dev2, _, addr2, _ := startSessionsWithSink(t, id, q2)
	c2 := dialRaw(t, dev2, addr2)
	g2.armed.Store(true)
	g2.fail.Store(true)
	c2.send(1, codes.POST, "/t/doomed", []byte("x"))
	g2.waitEntered(t)
	g2.release()
	c2.expect("telemetry whose fsync failed", 1, codes.InternalServerError)
	checkRefusals(t, coap.HubOf(s2), "dev-psk", hub.ReasonDiskError, 1)
}

// checkRefusals checks that h counted one telemetry refusal, over CoAP,
// with reason, and that device has it among its counters, after in
// messages admitted.
func checkRefusals(t *testing.T, h *hub.Hub, device, reason string, in int) {
	t.Helper()
	m := h.Metrics()
	if n := testutil.ToFloat64(m.Refused.WithLabelValues(hub.CoAP, reason)); n != 1 {
		t.Errorf("refusals{coap,%s} = %v, want 1", reason, n)
	}
	if n := testutil.CollectAndCount(m.Refused); n != 1 {
		t.Errorf("%d refusal series, want only {coap,%s}", n, reason)
	}
	if tr, _ := h.Traffic(device); tr.Refused != 1 || tr.MessagesIn != uint64(in) {
		t.Errorf("%s's counters %+v, want %d in and 1 refused", device, tr, in)
	}
}

// The queue's fsync outlasting the commit deadline: the device gets 5.03
// with Max-Age (as before: retry later), and the refusal is counted once,
// as commit_timeout, not as a full queue, for the transport and the
// device; the hub had counted the message in when the queue admitted it.
// The fsync failing after that answer counts nothing more.
func TestDurableTimeoutCounted(t *testing.T) {
	g := newSyncGate()
	q := openQueue(t, g, queue.Options{})
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, dev, _, addr, _, _ := startStoppable(t, id, q, 300*time.Millisecond)
	c := dialRaw(t, dev, addr)

	g.armed.Store(true)
	c.send(1, codes.POST, "/t/slow", []byte("x"))
	g.waitEntered(t)
	if a := c.expect("telemetry whose fsync outlasts the deadline", 1, codes.ServiceUnavailable); a.maxAge != 30 {
		t.Errorf("5.03 Max-Age %d, want 30 (RetryAfter)", a.maxAge)
	}
	checkRefusals(t, coap.HubOf(s), "dev-psk", hub.ReasonCommitTimeout, 1)

	g.fail.Store(true)
	g.release()
	q.Close() // returns once the writer has reported the failed fsync
	checkRefusals(t, coap.HubOf(s), "dev-psk", hub.ReasonCommitTimeout, 1)
}

// A device revoked, or a server stopped, while its telemetry waits for the
// Sink's callback: nothing crashes or leaks (goleak, TestMain), Run returns
// once the wait's bound has passed, and the callback coming after all that
// does nothing.
func TestDurableAnswerRevokedAndShutdown(t *testing.T) {
	sink := holdSink{held: make(chan heldMessage, 4)}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	s, dev, certDev, addr, certAddr, stop := startStoppable(t, id, sink, 300*time.Millisecond)

	c := dialRaw(t, dev, addr)
	c.send(1, codes.POST, "/t/revoked", []byte("x"))
	revoked := sink.next(t)
	id.revoke("dev-psk")
	for deadline := time.Now().Add(10 * time.Second); s.Sessions("dev-psk") != 0; {
		if time.Now().After(deadline) {
			t.Fatal("the revoked device's session is still open after 10 s")
		}
		time.Sleep(time.Millisecond)
	}
	revoked.done(nil) // answered to a closed session: dropped
	if err := request(t, certDev, certAddr); err != nil {
		t.Fatalf("another device after the revocation: %v", err)
	}

	cc := dialRaw(t, certDev, certAddr)
	cc.send(1, codes.POST, "/t/shutdown", []byte("x"))
	pending := sink.next(t)
	start := time.Now()
	stop()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Run returned %v after its context ended, want within the 300 ms + 1 s bound", took)
	}
	pending.done(nil) // after Run returned: the deadline answered already
}

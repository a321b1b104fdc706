package coap_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// heldMessage is telemetry a holdSink admitted: calling done says it is
// durable (nil) or why not, as the queue's writer does after its fsync.
type heldMessage struct {
	m      bridges.Message
	done   func(error)
	onLoop bool // admitted on the DTLS listener's read loop
}

// onReadLoop reports whether the caller runs on pion's listener read loop
// (requests answered inline).
func onReadLoop() bool {
	buf := make([]byte, 64<<10)
	return strings.Contains(string(buf[:runtime.Stack(buf, false)]), "udp.(*listener).readLoop")
}

// holdSink is a bridges.NotifySink whose QoS 1 messages become durable
// only when the test says so, as a queue waiting for its disk.
type holdSink struct{ held chan heldMessage }

func (s holdSink) Accept(ctx context.Context, m bridges.Message) error {
	ch, err := s.AcceptAsync(ctx, m)
	if err != nil || ch == nil {
		return err
	}
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s holdSink) AcceptAsync(ctx context.Context, m bridges.Message) (<-chan error, error) {
	ch := make(chan error, 1)
	pending, err := s.AcceptNotify(ctx, m, func(err error) { ch <- err })
	if !pending {
		return nil, err
	}
	return ch, nil
}

func (s holdSink) AcceptNotify(_ context.Context, m bridges.Message, done func(error)) (bool, error) {
	if m.QoS == 0 {
		return false, nil
	}
	s.held <- heldMessage{m: m, done: done, onLoop: onReadLoop()}
	return true, nil
}

func (s holdSink) next(t *testing.T) heldMessage {
	t.Helper()
	select {
	case h := <-s.held:
		return h
	case <-time.After(5 * time.Second):
		t.Fatal("no telemetry reached the Sink")
		return heldMessage{}
	}
}

// publish sends a confirmable POST on c in the background.
func publish(ctx context.Context, c *devicesim.CoAP, path string) <-chan devicesim.Response {
	out := make(chan devicesim.Response, 1)
	go func() {
		r, err := c.Publish(ctx, path, []byte("x"))
		if err != nil {
			r.Code = codes.Empty
		}
		out <- r
	}()
	return out
}

func answerOf(t *testing.T, what string, ch <-chan devicesim.Response) codes.Code {
	t.Helper()
	select {
	case r := <-ch:
		return r.Code
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no answer", what)
		return codes.Empty
	}
}

// With a Sink that admits without waiting, a device's confirmable
// telemetry is answered only once the Sink says it is durable (2.04), or
// refused (5.03 when the queue is full); while it waits, another session
// on the same listener does not wait with it (requests are answered on the
// listener's read loop, and the wait for the disk is not).
func TestTelemetryWaitsForDiskWithoutHoldingSessions(t *testing.T) {
	sink := holdSink{held: make(chan heldMessage, 4)}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _ := startSessionsWithSink(t, id, sink)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, err := dev.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := dev.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	slow := publish(ctx, a, "slow")
	held := sink.next(t)
	if held.m.Topic != "devices/dev-psk/t/slow" || held.m.QoS != 1 {
		t.Fatalf("Sink got %q QoS %d, want devices/dev-psk/t/slow QoS 1", held.m.Topic, held.m.QoS)
	}
	// Another session is answered meanwhile. (That the waiting session
	// itself reads on is otacache's TestServeDTLSInlineDeferred: go-coap's
	// client sends one request at a time.)
	r, err := b.Do(ctx, codes.GET, "/.well-known/core", nil, -1)
	if err != nil || r.Code != codes.Content {
		t.Fatalf("other session: GET /.well-known/core: %v %v, want 2.05", r.Code, err)
	}
	other := publish(ctx, b, "other")
	sink.next(t).done(nil)
	if code := answerOf(t, "telemetry of the other session", other); code != codes.Changed {
		t.Fatalf("other session's telemetry: %v, want 2.04", code)
	}
	select {
	case r := <-slow:
		t.Fatalf("telemetry answered (%v) before the Sink said it was durable", r.Code)
	default:
	}
	held.done(nil)
	if code := answerOf(t, "held telemetry", slow); code != codes.Changed {
		t.Fatalf("held telemetry: %v, want 2.04", code)
	}
	// A durable write that fails as a full queue: 5.03, as before.
	full := publish(ctx, a, "full")
	h := sink.next(t)
	h.done(bridges.ErrQueueFull)
	if code := answerOf(t, "telemetry refused by the queue", full); code != codes.ServiceUnavailable {
		t.Fatalf("telemetry the queue refused: %v, want 5.03", code)
	}
	// The session's third request: long after its handler was set, so
	// taken on the read loop.
	if !h.onLoop {
		t.Error("telemetry of a device session with a NotifySink was not admitted on the listener's read loop")
	}
}

// blockingSink is a Sink without AcceptAsync: its Accept may wait, so it
// must never be called on the listener's read loop.
type blockingSink struct{ onLoop chan bool }

func (s blockingSink) Accept(context.Context, bridges.Message) error {
	s.onLoop <- onReadLoop()
	return nil
}

// With a Sink that may wait, device sessions keep their own record reader:
// Accept never runs on the listener's read loop, where it would hold up
// every session.
func TestBlockingSinkNotOnReadLoop(t *testing.T) {
	sink := blockingSink{onLoop: make(chan bool, 8)}
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _ := startSessionsWithSink(t, id, sink)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := dev.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		r, err := c.Publish(ctx, fmt.Sprint("x", i), []byte("x"))
		if err != nil || r.Code != codes.Changed {
			t.Fatalf("publish %d: %v %v, want 2.04", i, r.Code, err)
		}
		if <-sink.onLoop {
			t.Fatalf("publish %d: a Sink that may wait was called on the listener's read loop", i)
		}
	}
}

package hub

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
)

// Deliver to an observed device allocates nothing per command (the
// observers are collected in an array on the stack, the delivery lock is
// a plain mutex).
func TestAllocsDeliver(t *testing.T) {
	h, err := New(LocalSink{}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	cancel := h.Observe("d1", "devices/d1/c/led", func(bridges.Message) { n++ })
	defer cancel()
	m := bridges.Message{Device: "d1", Topic: "devices/d1/c/led", Payload: []byte("on")}
	ctx := context.Background()
	if err := h.Deliver(ctx, m); err != nil { // the first stores the topic
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(100, func() { _ = h.Deliver(ctx, m) }); a > 0 {
		t.Errorf("Deliver: %v allocations per command, want 0", a)
	}
	if n == 0 {
		t.Error("the observer got nothing")
	}
}

// DeliverReached says whether a device session got the command: a CoAP
// observer of its topic or a mirror that handed it to a subscriber (the
// MQTT broker's); a mirror that only looks (the firmware status mirror)
// or an observer of another topic does not count. Mutation that fails it:
// ignoring the mirrors' answer (returning len(fns) > 0).
func TestDeliverReached(t *testing.T) {
	h, err := New(LocalSink{}, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	subscribed := false
	h.AddMirror(MQTT, func(m bridges.Message) bool { return subscribed })
	h.AddMirror("firmware", func(bridges.Message) bool { return false })
	cancel := h.Observe("d1", "devices/d1/c/other", func(bridges.Message) {})
	defer cancel()
	ctx := context.Background()
	m := bridges.Message{Device: "d1", Topic: "devices/d1/c/led", Payload: []byte("on")}
	if r, err := h.DeliverReached(ctx, m); err != nil || r {
		t.Fatalf("nobody on the topic: reached=%v err=%v, want false", r, err)
	}
	if err := h.Downlink(ctx, m); !errors.Is(err, bridges.ErrNoReceiver) {
		t.Fatalf("Downlink with nobody on the topic: %v, want ErrNoReceiver", err)
	}
	if err := h.Deliver(ctx, m); err != nil {
		t.Fatalf("Deliver with nobody on the topic: %v, want nil (taken and kept)", err)
	}
	subscribed = true
	if r, err := h.DeliverReached(ctx, m); err != nil || !r {
		t.Fatalf("MQTT subscriber: reached=%v err=%v, want true", r, err)
	}
	subscribed = false
	c2 := h.Observe("d1", "devices/d1/c", func(bridges.Message) {})
	defer c2()
	if err := h.Downlink(ctx, m); err != nil {
		t.Fatalf("CoAP observer: Downlink %v, want nil", err)
	}
}

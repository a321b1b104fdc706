package hub

import (
	"context"
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

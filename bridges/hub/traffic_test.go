package hub

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
)

type toggleSink struct{ full bool }

func (s *toggleSink) Accept(context.Context, bridges.Message) error {
	if s.full {
		return bridges.ErrQueueFull
	}
	return nil
}

func TestTrafficCounters(t *testing.T) {
	sink := &toggleSink{}
	h, err := New(sink, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, ok := h.Traffic("d1"); ok {
		t.Fatal("counters for a device never seen")
	}
	at := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for i := 0; i < 3; i++ {
		if err := h.Telemetry(ctx, "coap", bridges.Message{Device: "d1", Topic: "devices/d1/t/temp", Payload: []byte("21.5"), Received: at}); err != nil {
			t.Fatal(err)
		}
	}
	sink.full = true
	if err := h.Telemetry(ctx, "mqtt", bridges.Message{Device: "d1", Topic: "devices/d1/t/temp", Payload: []byte("x")}); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("full sink: %v", err)
	}
	if err := h.Deliver(ctx, bridges.Message{Device: "d1", Topic: "devices/d1/c/on", Payload: []byte("1")}); err != nil {
		t.Fatal(err)
	}
	got, ok := h.Traffic("d1")
	want := Traffic{MessagesIn: 3, BytesIn: 12, Refused: 1, MessagesOut: 1, BytesOut: 1, LastSeen: at}
	if !ok || got != want {
		t.Errorf("traffic = %+v, want %+v", got, want)
	}
	h.Forget("d1")
	if _, ok := h.Traffic("d1"); ok {
		t.Error("counters survive Forget")
	}
}

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

// The privacy opt-outs erase what was kept and keep nothing new of it.
func TestTrafficOptOut(t *testing.T) {
	h, err := New(&toggleSink{}, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	at := time.Date(2026, 11, 25, 1, 0, 0, 0, time.UTC)
	send := func(dev string) {
		t.Helper()
		if err := h.Telemetry(ctx, "coap", bridges.Message{Device: dev, Topic: "devices/" + dev + "/t/x", Payload: []byte("12"), Received: at}); err != nil {
			t.Fatal(err)
		}
	}
	send("d1")
	h.SetTrafficOptOut(TrafficOptOut{LastSeen: true})
	if got, _ := h.Traffic("d1"); got != (Traffic{MessagesIn: 1, BytesIn: 2}) {
		t.Errorf("last seen opted out, kept %+v", got)
	}
	send("d1")
	if got, _ := h.Traffic("d1"); got != (Traffic{MessagesIn: 2, BytesIn: 4}) {
		t.Errorf("last seen opted out, new message kept %+v", got)
	}
	h.SetTrafficOptOut(TrafficOptOut{Counters: true})
	if got, _ := h.Traffic("d1"); got != (Traffic{}) {
		t.Errorf("counters opted out, kept %+v", got)
	}
	send("d1")
	if got, _ := h.Traffic("d1"); got != (Traffic{LastSeen: at}) {
		t.Errorf("counters opted out: kept %+v, want only last seen", got)
	}
	h.SetTrafficOptOut(TrafficOptOut{Counters: true, LastSeen: true})
	send("d2")
	if _, ok := h.Traffic("d1"); ok {
		t.Error("both opted out: d1 still has an entry")
	}
	if _, ok := h.Traffic("d2"); ok {
		t.Error("both opted out: d2 got an entry")
	}
	h.SetTrafficOptOut(TrafficOptOut{})
	send("d2")
	if got, _ := h.Traffic("d2"); got != (Traffic{MessagesIn: 1, BytesIn: 2, LastSeen: at}) {
		t.Errorf("opted back in: %+v", got)
	}
}

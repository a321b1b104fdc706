package hub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
)

// Commands from the cloud for device ids nobody knows (the audit's
// TestAuditDeliverUnknownDevicesUnbounded: 50000 ghosts, all kept) are
// kept only up to maxLastBytes in total; beyond it a command is refused
// (counted, Deliver returns ErrCommandsFull), nothing kept before is
// evicted, and a command to nobody makes no traffic row. Mutations that
// fail it: the byte check taken out of keep (the store grows past the
// bound), or traffic.update instead of updateExisting for an unreached
// command (50000 rows).
func TestDeliverUnknownDevicesBounded(t *testing.T) {
	h, err := New(LocalSink{}, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	refused := 0
	for i := range 50000 {
		id := fmt.Sprintf("ghost%d", i)
		err := h.Deliver(ctx, bridges.Message{Device: id, Topic: "devices/" + id + "/c/x", Payload: make([]byte, 64)})
		switch {
		case errors.Is(err, ErrCommandsFull):
			refused++
		case err != nil:
			t.Fatal(err)
		}
	}
	if h.lastBytes > maxLastBytes || len(h.last)*(lastOverhead+64) > maxLastBytes {
		t.Errorf("hub keeps %d last commands, %d bytes; bound %d bytes", len(h.last), h.lastBytes, maxLastBytes)
	}
	if refused == 0 || refused+len(h.last) != 50000 {
		t.Errorf("%d refused, %d kept, want them to add up to 50000 with some refused", refused, len(h.last))
	}
	if got := testutil.ToFloat64(h.m.Refused.WithLabelValues("gateway", ReasonCommandsFull)); int(got) != refused {
		t.Errorf("refusals counted %v, want %d", got, refused)
	}
	if _, ok := h.LastCommand("devices/ghost0/c/x"); !ok {
		t.Error("the first ghost's command was evicted; kept commands must stay")
	}
	h.traffic.mu.Lock()
	rows := len(h.traffic.m)
	h.traffic.mu.Unlock()
	if rows != 0 {
		t.Errorf("%d traffic rows for devices no session of which got a command", rows)
	}
}

// A command that cannot be kept drops the one kept before on its topic,
// so a plain GET never returns a stale command; the per-device topic bound
// is counted the same way; and the command still reaches an observer.
// Mutation that fails it: the deletion of the old entry in keep removed.
func TestDeliverFullDropsStale(t *testing.T) {
	h, err := New(LocalSink{}, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	topic := "devices/d1/c/x"
	if err := h.Deliver(ctx, bridges.Message{Device: "d1", Topic: topic, Payload: []byte("old")}); err != nil {
		t.Fatal(err)
	}
	var got []string
	cancel := h.Observe("d1", topic, func(m bridges.Message) { got = append(got, string(m.Payload)) })
	defer cancel()
	big := make([]byte, maxLastBytes)
	if err := h.Deliver(ctx, bridges.Message{Device: "d1", Topic: topic, Payload: big}); err != nil {
		t.Fatalf("Deliver to an observer: %v, want nil (it was received)", err)
	}
	if m, ok := h.LastCommand(topic); ok {
		t.Errorf("GET would return %d bytes, the stale command; want none", len(m.Payload))
	}
	if len(got) != 1 || len(got[0]) != maxLastBytes {
		t.Errorf("observer did not get the command that was not kept")
	}
	if h.lastBytes != 0 || h.nLast["d1"] != 0 {
		t.Errorf("accounting after the drop: %d bytes, %d topics; want 0, 0", h.lastBytes, h.nLast["d1"])
	}
	for i := range maxLastPerDevice + 1 {
		err := h.Deliver(ctx, bridges.Message{Device: "d2", Topic: fmt.Sprintf("devices/d2/c/t%d", i), Payload: []byte("1")})
		if (i < maxLastPerDevice) != (err == nil) {
			t.Errorf("topic %d of d2: %v", i, err)
		}
	}
	if got := testutil.ToFloat64(h.m.Refused.WithLabelValues("gateway", ReasonCommandsFull)); got != 2 {
		t.Errorf("refusals counted %v, want 2", got)
	}
}

// Forget (revocation) is not undone by a later Deliver: nothing is kept
// for the device again, and it is not counted as a refusal, until a
// session of the device proves it again (telemetry). The audit's test
// delivered to a Forgotten ghost and found its command kept. Mutation that
// fails it: the forgotten check removed from keep.
func TestForgetNotUndoneByDeliver(t *testing.T) {
	h, err := New(LocalSink{}, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	topic := "devices/d1/c/x"
	if err := h.Telemetry(ctx, CoAP, bridges.Message{Device: "d1", Topic: "devices/d1/t/x"}); err != nil {
		t.Fatal(err)
	}
	h.Deliver(ctx, bridges.Message{Device: "d1", Topic: topic, Payload: []byte("before")})
	h.Forget("d1")
	if err := h.Deliver(ctx, bridges.Message{Device: "d1", Topic: topic, Payload: []byte("to a revoked device")}); err != nil {
		t.Fatalf("Deliver to a forgotten device: %v", err)
	}
	if _, ok := h.LastCommand(topic); ok {
		t.Error("a command to a forgotten device was kept")
	}
	if _, ok := h.Traffic("d1"); ok {
		t.Error("a traffic row came back for a forgotten device")
	}
	if h.lastBytes != 0 {
		t.Errorf("lastBytes %d after Forget, want 0", h.lastBytes)
	}
	// Enrolled again: its session sends telemetry.
	if err := h.Telemetry(ctx, CoAP, bridges.Message{Device: "d1", Topic: "devices/d1/t/x"}); err != nil {
		t.Fatal(err)
	}
	h.Deliver(ctx, bridges.Message{Device: "d1", Topic: topic, Payload: []byte("after")})
	if m, ok := h.LastCommand(topic); !ok || string(m.Payload) != "after" {
		t.Errorf("after the device came back: %q %v, want \"after\" kept", m.Payload, ok)
	}
}

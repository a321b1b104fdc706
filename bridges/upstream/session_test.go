package upstream

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// TestBacklogDrainsInOrder: a backlog of 400 written before the link
// starts goes out through the link's own sender (many PUBLISHes per write,
// the window refilled from PUBACKs on paho's receive goroutine, window 64
// against a broker granting Receive Maximum 4) in queue order, without
// duplicates, on one connection, and the queue drains. (Mosquitto 2.0.11
// did not disconnect a client exceeding its Receive Maximum when checked
// by hand, so this does not prove that bound; linkSession.addPublish keeps
// it.)
func TestBacklogDrainsInOrder(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{Config: "max_inflight_messages 4\n"})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	cfg := linkConfig(t, b, "gw1")
	cfg.Window = 64
	dir := t.TempDir()

	// A backlog first (no link running), then the link drains it.
	q, err := queue.Open(dir, queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const n = 400
	var want []string
	for i := range n {
		m := telemetry("dev0", i)
		if err := q.Accept(ctx, m); err != nil {
			t.Fatalf("Accept %d: %v", i, err)
		}
		want = append(want, string(m.Payload))
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	l := startLink(t, cfg, dir)
	var got []string
	deadline := time.After(30 * time.Second)
	for len(got) < n {
		select {
		case p := <-sub.Got:
			got = append(got, string(p.Payload))
		case <-deadline:
			t.Fatalf("cloud got %d of %d; link status %+v", len(got), n, l.up.Status())
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("cloud received (-want +got):\n%s", diff)
	}
	waitFor(t, "queue drained", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	raw, err := os.ReadFile(b.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	if c := strings.Count(string(raw), "New client connected from 127.0.0.1:"); c != 2 { // cloud-sub and gw1, once each
		t.Errorf("broker saw %d connections, want 2 (the link must not be disconnected); broker log:\n%s", c, raw)
	}
}

// TestBrokerRefusalKeepsMessage: a PUBACK with a failure reason (Mosquitto
// answers a message above its message_size_limit with 0x95, then closes
// the connection) leaves that message in the queue, counted as a publish
// error, while the message before it is delivered and deleted.
func TestBrokerRefusalKeepsMessage(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{Config: "message_size_limit 64\n"})
	sub := mosquitto.Subscribe(t, b, "cloud-sub", "bastion/#", false)
	l := startLink(t, linkConfig(t, b, "gw1"), t.TempDir())
	waitFor(t, "link connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	ctx := context.Background()
	big := telemetry("big", 1)
	big.Payload = []byte(`{"pad":"` + strings.Repeat("x", 100) + `"}`)
	for _, m := range []bridges.Message{telemetry("small", 1), big} {
		if err := l.up.Accept(ctx, m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
	}
	select {
	case p := <-sub.Got:
		if p.Topic != "bastion/gw1/small/t/n" {
			t.Fatalf("cloud got %s, want bastion/gw1/small/t/n", p.Topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the accepted message never arrived; status %+v", l.up.Status())
	}
	waitFor(t, "refusals counted", 10*time.Second, func() bool { return metric(t, l, "bastion_upstream_publish_errors_total") >= 2 })
	if st := l.q.Stats(); st.Depth != 1 {
		t.Errorf("queue depth %d after refusals, want 1 (the refused message kept)", st.Depth)
	}
	if got := l.up.Status().Published; got != 1 {
		t.Errorf("Published = %d, want 1", got)
	}
	select {
	case p := <-sub.Got:
		t.Errorf("cloud got %s after the refusal", p.Topic)
	default:
	}
}

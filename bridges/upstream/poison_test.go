package upstream

import (
	"context"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// queueBefore puts ms in a queue in dir before the link starts, so that the
// first connection's run reads them all.
func queueBefore(t *testing.T, dir string, ms ...bridges.Message) {
	t.Helper()
	q, err := queue.Open(dir, queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if err := q.Accept(context.Background(), m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestParkAloneByReceiveMaximum: a broker whose CONNACK Receive Maximum is 1
// closes the connection (no DISCONNECT) on a topic of more than 7 levels.
// Every PUBLISH is then alone in flight, whatever the link's window: the
// message is named by the first such end and parked after three, not one
// connection later (the link counted a message as alone only when its slow
// start window was 1).
func TestParkAloneByReceiveMaximum(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) { b.autoAck, b.closeAbove, b.recvMax = true, 7, 1 })
	dir := t.TempDir()
	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	queueBefore(t, dir, deep, telemetry("b", 1), telemetry("c", 2))
	l := startLink(t, fb.config(t), dir)
	p := startParking(t, l, t.TempDir())
	expectAcked(t, fb, l, "bastion/gw1/b/t/n", "bastion/gw1/c/t/n")
	waitFor(t, "the deep message parked", 20*time.Second, func() bool { return p.Stats().Depth == 1 })
	if n := fb.closes.Load(); n != poisonStrikes {
		t.Errorf("the broker closed %d connections on the deep message, want %d (alone in flight each time)", n, poisonStrikes)
	}
	if v := metricLabel(t, l, "bastion_upstream_parked_total", "connection_closed"); v != 1 {
		t.Errorf("bastion_upstream_parked_total{reason=connection_closed} = %v, want 1", v)
	}
}

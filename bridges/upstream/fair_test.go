package upstream

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// gateLink is a link with cfg in front of q, not running: for what its
// admission (gate) and its PUBACK handling decide.
func gateLink(t *testing.T, cfg Config, q Source) *Upstream {
	t.Helper()
	rs, err := cfg.compile()
	if err != nil {
		t.Fatal(err)
	}
	u := &Upstream{log: testLog(), q: q, m: newMetrics(), lines: ratelog.New(time.Minute)}
	u.cur.Store(&snapshot{cfg: cfg, routes: rs})
	return u
}

func openQueue(t *testing.T) *queue.Queue {
	t.Helper()
	q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// TestTopicBeyondLimitsRefusedAtAdmission: a message whose upstream topic
// is beyond upstream.max_topic_levels or max_topic_length is refused to its
// device (bridges.ErrTopicRefused, which the transports answer as a bad
// topic), counted, and nothing is stored. It used to be acknowledged,
// queued, and found unsendable only when due: parked (one device could
// fill the parking queue with such messages, then hold its own messages
// behind the one that did not fit). A message a privacy rule keeps local
// is withheld, as before, whatever its upstream topic.
func TestTopicBeyondLimitsRefusedAtAdmission(t *testing.T) {
	q := openQueue(t)
	cfg := validConfig()
	cfg.MaxTopicLevels, cfg.MaxTopicLength = 7, 40
	cfg.Forward = append([]Rule{{Topic: "devices/+/t/local/#", Action: ActionLocal}}, cfg.Forward...)
	u := gateLink(t, cfg, q)
	p := startParkingQueue(t, t.TempDir())
	u.SetParking(p)
	ctx := context.Background()

	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}                    // bastion/gw1/deep/t/a/b/c/d: 8 levels
	long := bridges.Message{Device: "long", Topic: "devices/long/t/" + strings.Repeat("x", 30), QoS: 1, Payload: []byte(`{}`)} // 47 bytes upstream
	accepts := map[string]func(bridges.Message) error{
		"Accept": func(m bridges.Message) error { return u.Accept(ctx, m) },
		"AcceptAsync": func(m bridges.Message) error {
			_, err := u.AcceptAsync(ctx, m)
			return err
		},
		"AcceptNotify": func(m bridges.Message) error {
			_, err := u.AcceptNotify(ctx, m, func(error) {})
			return err
		},
	}
	for name, accept := range accepts {
		for _, m := range []bridges.Message{deep, long} {
			err := accept(m)
			if !errors.Is(err, bridges.ErrTopicRefused) {
				t.Errorf("%s of %s: %v, want bridges.ErrTopicRefused", name, m.Topic, err)
			}
		}
	}
	if err := accepts["Accept"](deep); err == nil || !strings.Contains(err.Error(), `"bastion/gw1/deep/t/a/b/c/d" has 8 levels, more than upstream.max_topic_levels 7`) {
		t.Errorf("refusal %v, want the upstream topic and the limit", err)
	}
	local := bridges.Message{Device: "deep", Topic: "devices/deep/t/local/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	if err := u.Accept(ctx, local); err != nil {
		t.Errorf("Accept of a message a rule keeps local: %v, want nil (withheld)", err)
	}
	if err := u.Accept(ctx, telemetry("a", 1)); err != nil {
		t.Fatalf("Accept of a message within the limits: %v", err)
	}
	if d, pd := q.Stats().Depth, p.Stats().Depth; d != 1 || pd != 0 {
		t.Errorf("queued %d, parked %d; want 1 (the message within the limits), 0", d, pd)
	}
	if n := testutil.ToFloat64(u.m.refused.WithLabelValues("topic_too_deep")); n != 4 {
		t.Errorf("bastion_upstream_refused_total{reason=topic_too_deep} = %v, want 4", n)
	}
	if n := testutil.ToFloat64(u.m.refused.WithLabelValues("topic_too_long")); n != 3 {
		t.Errorf("bastion_upstream_refused_total{reason=topic_too_long} = %v, want 3", n)
	}
}

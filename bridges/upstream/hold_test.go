package upstream

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// TestHeldRulesKeepQueued: while the rules hold (the gateway cannot read
// its privacy rules), queued messages, each acknowledged to its device,
// stay queued and unsent, and a new message is refused as a full queue
// (its device keeps it), not withheld. Before, the gateway put a local
// rule on # in force instead, and the link deleted every queued message
// unsent and told devices their new ones were accepted. Once the rules
// can be read again, the queued messages are sent.
func TestHeldRulesKeepQueued(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	cfg := linkConfig(t, b, "gw1")
	b.Stop(t)
	l := startLink(t, cfg, t.TempDir())
	ctx := context.Background()
	for i := range 3 {
		if err := l.up.Accept(ctx, telemetry("dev0", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.up.SetForward(append([]Rule{{Topic: "#", Action: ActionHold}}, cfg.Forward...)); err != nil {
		t.Fatal(err)
	}
	if err := l.up.Accept(ctx, telemetry("dev0", 3)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Errorf("Accept while the rules hold: %v, want bridges.ErrQueueFull", err)
	}
	if got := metricLabel(t, l, "bastion_upstream_refused_total", "rules_unreadable"); got != 1 {
		t.Errorf("refused{rules_unreadable} = %v, want 1", got)
	}
	if got := l.up.Status().Withheld; got != 0 {
		t.Errorf("withheld %d, want 0: a held message is refused, not withheld", got)
	}
	b.Start(t)
	// The run reached the first queued message and stopped there (or,
	// wrongly, took the queued messages out).
	waitFor(t, "the link to stop at the held rules", 20*time.Second, func() bool {
		return strings.Contains(l.up.Status().LastError, "privacy forwarding rules cannot be read") || l.q.Stats().Depth != 3
	})
	if d := l.q.Stats().Depth; d != 3 {
		t.Errorf("queue depth %d while the rules hold, want the 3 queued messages", d)
	}
	if st := l.up.Status(); st.Published != 0 || st.Withheld != 0 {
		t.Errorf("published %d, withheld %d while the rules hold; want 0, 0", st.Published, st.Withheld)
	}
	if got := metric(t, l, "bastion_upstream_withheld_queued_total"); got != 0 {
		t.Errorf("withheld_queued = %v, want 0", got)
	}
	if err := l.up.SetForward(cfg.Forward); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the queued messages sent once the rules can be read", 20*time.Second, func() bool { return l.up.Status().Published == 3 })
	waitFor(t, "the queue to be empty", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
}

// TestRulesReplacedWakeTheSender: a run that stopped at rules that hold
// ends with a pause, up to backoff_max; rules replaced through SetForward
// start the next run at once. Before, the queued messages waited for the
// pause (backoff_max is 2 minutes by default; here the pause is 10
// minutes, so the wait below can only end by the wake-up).
func TestRulesReplacedWakeTheSender(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	cfg := linkConfig(t, b, "gw1")
	cfg.BackoffMin, cfg.BackoffMax = 10*time.Minute, 20*time.Minute
	l := startLink(t, cfg, t.TempDir())
	waitFor(t, "the link to connect", 20*time.Second, func() bool { return l.up.Status().Connected })
	if err := l.up.SetForward(append([]Rule{{Topic: "#", Action: ActionHold}}, cfg.Forward...)); err != nil {
		t.Fatal(err)
	}
	// Queued directly (the link's gate refuses new messages while the
	// rules hold): as if accepted before the rules became unreadable.
	ctx := context.Background()
	for i := range 3 {
		if err := l.q.Accept(ctx, telemetry("dev0", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the link to stop at the held rules", 20*time.Second, func() bool {
		return strings.Contains(l.up.Status().LastError, "privacy forwarding rules cannot be read")
	})
	if err := l.up.SetForward(cfg.Forward); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the queued messages sent once the rules can be read", 20*time.Second, func() bool { return l.up.Status().Published == 3 })
}

package gateway

import (
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/store"
)

// TestForwardRulesFailClosed: the effective rules are the console's, a
// local rule for firmware status reports while the firmware.status opt-out
// is on, and the file's; when the console's cannot be read (one of them
// may keep a topic local), the link holds: nothing is forwarded, and
// nothing queued is deleted, as the local rule on # that used to stand in
// for them did.
func TestForwardRulesFailClosed(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := &Gateway{store: s, log: slog.New(slog.DiscardHandler)}
	file := upstream.Config{Forward: []upstream.Rule{{Topic: "devices/+/t/#", Action: upstream.ActionForward}}}
	if _, err := s.PutForwardRule(store.ForwardRule{Topic: "devices/+/t/location", Action: upstream.ActionLocal}); err != nil {
		t.Fatal(err)
	}
	want := []upstream.Rule{{Topic: "devices/+/t/location", Action: upstream.ActionLocal}, file.Forward[0]}
	if diff := cmp.Diff(want, g.forwardRules(file)); diff != "" {
		t.Errorf("rules with the console's readable (-want +got):\n%s", diff)
	}
	if g.rulesHeld.Load() {
		t.Error("rules held with the console's readable")
	}
	if err := s.SetOptOut(optOutFwStatus, true); err != nil {
		t.Fatal(err)
	}
	want = []upstream.Rule{{Topic: "devices/+/t/location", Action: upstream.ActionLocal}, {Topic: "devices/+/s/fw/#", Action: upstream.ActionLocal}, file.Forward[0]}
	if diff := cmp.Diff(want, g.forwardRules(file)); diff != "" {
		t.Errorf("rules with the firmware.status opt-out on (-want +got):\n%s", diff)
	}
	s.Close() // a store that cannot be read
	want = []upstream.Rule{{Topic: "#", Action: upstream.ActionHold}, file.Forward[0]}
	if diff := cmp.Diff(want, g.forwardRules(file)); diff != "" {
		t.Errorf("rules with the console's unreadable (-want +got):\n%s", diff)
	}
	if !g.rulesHeld.Load() {
		t.Error("rules not marked held with the console's unreadable (the console shows no alarm)")
	}
}

// TestOptOutsUnreadableEraseNothing: opt-outs that cannot be read at start
// erase nothing. They used to count as every opt-out switched on, and the
// start erased every device's stored firmware status report.
func TestOptOutsUnreadableEraseNothing(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := &Gateway{store: s, log: slog.New(slog.DiscardHandler)}
	report := []byte(`{"state":"installed","version":"1.1.0","at":"` + time.Now().UTC().Format(time.RFC3339) + `"}`)
	if err := s.PutFirmwareStatuses(map[string][]byte{"d1": report}); err != nil {
		t.Fatal(err)
	}
	g.startOptOutsFrom(nil, errors.New("bucket unreadable"))
	got, err := s.FirmwareStatuses()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string][]byte{"d1": report}, got); diff != "" {
		t.Errorf("stored firmware status after a start with unreadable opt-outs (-want +got):\n%s", diff)
	}
	// Read as on, the opt-out erases them, as it should.
	g.startOptOutsFrom(map[string]bool{optOutFwStatus: true}, nil)
	if got, err := s.FirmwareStatuses(); err != nil || len(got) != 0 {
		t.Errorf("stored firmware status with the opt-out on: %q %v, want none", got, err)
	}
}

package gateway

import (
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/store"
)

// TestForwardRulesFailClosed: the effective rules are the console's and the
// file's; when the console's cannot be read (one of them may keep a topic
// local), nothing is forwarded instead of the file's rules alone.
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
	s.Close() // a store that cannot be read
	want = []upstream.Rule{{Topic: "#", Action: upstream.ActionLocal}}
	if diff := cmp.Diff(want, g.forwardRules(file)); diff != "" {
		t.Errorf("rules with the console's unreadable (-want +got):\n%s", diff)
	}
}

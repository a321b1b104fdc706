package store

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestFirstAdminIsOnceAndSpendsTheCode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	s.SetMeta("code", []byte("hash"))
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := s.CreateFirstAdmin(AdminUser{Name: "root", Role: "admin", Created: now}, "exists", "code"); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateFirstAdmin(AdminUser{Name: "eve", Role: "admin", Created: now}, "exists", "code"); !errors.Is(err, ErrExists) {
		t.Errorf("second first admin: %v, want ErrExists", err)
	}
	if _, err := s.Meta("code"); !errors.Is(err, ErrNotFound) {
		t.Errorf("setup code hash still stored: %v", err)
	}
	if _, err := s.Meta("exists"); err != nil {
		t.Errorf("marker: %v", err)
	}
	// The last admin can be neither demoted nor deleted.
	if _, err := s.UpdateAdmin("root", func(u *AdminUser) error { u.Role = "viewer"; return nil }); !errors.Is(err, ErrLastAdmin) {
		t.Errorf("demote the last admin: %v", err)
	}
	if err := s.DeleteAdmin("root"); !errors.Is(err, ErrLastAdmin) {
		t.Errorf("delete the last admin: %v", err)
	}
	s.AddAdmin(AdminUser{Name: "ann", Role: "admin"})
	s.PutSession(Session{Hash: "h1", User: "root"})
	s.PutSession(Session{Hash: "h2", User: "ann"})
	s.PutAPIToken(APIToken{Hash: "t1", ID: "i1", User: "root"})
	if err := s.DeleteAdmin("root"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Session("h1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted account's session: %v", err)
	}
	if _, err := s.APIToken("t1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted account's token: %v", err)
	}
	if _, err := s.Session("h2"); err != nil {
		t.Errorf("other account's session gone: %v", err)
	}
	// Forwarding rules: one per topic, and they survive a restart.
	r1, _ := s.PutForwardRule(ForwardRule{Topic: "devices/+/t/a", Action: "forward"})
	r2, _ := s.PutForwardRule(ForwardRule{Topic: "devices/+/t/a", Action: "local"})
	s.PutForwardRule(ForwardRule{Topic: "devices/#", Action: "local"})
	if r1.ID != r2.ID {
		t.Errorf("same topic got ids %s and %s", r1.ID, r2.ID)
	}
	s.Close()
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rs, _ := s.ForwardRules()
	var got []string
	for _, r := range rs {
		got = append(got, r.Topic+" "+r.Action)
	}
	if d := cmp.Diff([]string{"devices/# local", "devices/+/t/a local"}, got); d != "" {
		t.Errorf("rules after reopen (-want +got):\n%s", d)
	}
	if err := s.Check(); err != nil {
		t.Error(err)
	}
}

// EndAccess deletes the user's sessions but the one kept and all the
// user's API tokens, nobody else's.
func TestEndAccess(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, x := range []Session{{Hash: "s1", User: "root"}, {Hash: "s2", User: "root"}, {Hash: "s3", User: "ann"}} {
		s.PutSession(x)
	}
	for _, x := range []APIToken{{Hash: "t1", ID: "i1", User: "root"}, {Hash: "t2", ID: "i2", User: "root"}, {Hash: "t3", ID: "i3", User: "ann"}} {
		s.PutAPIToken(x)
	}
	n, err := s.EndAccess("root", "s2")
	if err != nil || n != 2 {
		t.Fatalf("EndAccess: %d tokens, %v; want 2, nil", n, err)
	}
	var left []string
	for _, h := range []string{"s1", "s2", "s3"} {
		if _, err := s.Session(h); err == nil {
			left = append(left, h)
		}
	}
	ts, _ := s.APITokens()
	for _, x := range ts {
		left = append(left, x.Hash)
	}
	if d := cmp.Diff([]string{"s2", "s3", "t3"}, left); d != "" {
		t.Errorf("sessions and tokens left (-want +got):\n%s", d)
	}
}

// A touch updates a record that exists and never makes one; TakeMeta
// spends a value only when spend says so.
func TestTouchAndTake(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := s.TouchSession("gone", at); !errors.Is(err, ErrNotFound) {
		t.Errorf("touch of a missing session: %v, want ErrNotFound", err)
	}
	if err := s.TouchAPIToken("gone", at); !errors.Is(err, ErrNotFound) {
		t.Errorf("touch of a missing token: %v, want ErrNotFound", err)
	}
	if _, err := s.Session("gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("a touch made a session: %v", err)
	}
	s.PutSession(Session{Hash: "s1", User: "root", CSRF: "c"})
	if err := s.TouchSession("s1", at); err != nil {
		t.Fatal(err)
	}
	if x, _ := s.Session("s1"); !x.LastSeen.Equal(at) || x.CSRF != "c" {
		t.Errorf("touched session %+v, want LastSeen %v and the rest kept", x, at)
	}
	s.SetMeta("code", []byte("abc"))
	if ok, err := s.TakeMeta("code", func(v []byte) bool { return string(v) == "xyz" }); ok || err != nil {
		t.Errorf("take with a wrong value: %v %v, want false nil", ok, err)
	}
	if ok, err := s.TakeMeta("code", func(v []byte) bool { return string(v) == "abc" }); !ok || err != nil {
		t.Errorf("take with the value: %v %v, want true nil", ok, err)
	}
	if ok, err := s.TakeMeta("code", func([]byte) bool { return true }); ok || err != nil {
		t.Errorf("take of a spent value: %v %v, want false nil", ok, err)
	}
}

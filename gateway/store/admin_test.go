package store

import (
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
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

// accessLeft lists the sessions (of s1, s2, s3) and the API tokens left.
func accessLeft(t *testing.T, s *Store) []string {
	t.Helper()
	var left []string
	for _, h := range []string{"s1", "s2", "s3"} {
		if _, err := s.Session(h); err == nil {
			left = append(left, h)
		}
	}
	ts, err := s.APITokens()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range ts {
		left = append(left, x.Hash)
	}
	return left
}

// SetPasswordEndAccess sets the password and deletes the user's sessions
// but the one kept and all the user's API tokens, nobody else's, in one
// transaction: when it fails after the password is written, the old
// password and every session and token are still there (in two
// transactions, the console's password change used to leave the new
// password beside the old sessions and tokens). A missing account is
// ErrNotFound, and is not made.
func TestSetPasswordEndAccess(t *testing.T) {
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	setUp := func(t *testing.T) *Store {
		s, _ := open(t)
		for _, u := range []AdminUser{{Name: "root", Role: "admin", PasswordHash: "old"}, {Name: "ann", Role: "admin", PasswordHash: "ann's"}} {
			if err := s.AddAdmin(u); err != nil {
				t.Fatal(err)
			}
		}
		for _, x := range []Session{{Hash: "s1", User: "root"}, {Hash: "s2", User: "root"}, {Hash: "s3", User: "ann"}} {
			s.PutSession(x)
		}
		for _, x := range []APIToken{{Hash: "t1", ID: "i1", User: "root"}, {Hash: "t2", ID: "i2", User: "root"}, {Hash: "t3", ID: "i3", User: "ann"}} {
			s.PutAPIToken(x)
		}
		return s
	}
	t.Run("done", func(t *testing.T) {
		s := setUp(t)
		n, err := s.SetPasswordEndAccess("root", "new", at, "s2")
		if err != nil || n != 2 {
			t.Fatalf("SetPasswordEndAccess: %d tokens, %v; want 2, nil", n, err)
		}
		if u, _ := s.Admin("root"); u.PasswordHash != "new" || !u.PasswordSet.Equal(at) || u.Role != "admin" {
			t.Errorf("account after the change: %+v, want password new set at %v, role kept", u, at)
		}
		if d := cmp.Diff([]string{"s2", "s3", "t3"}, accessLeft(t, s)); d != "" {
			t.Errorf("sessions and tokens left (-want +got):\n%s", d)
		}
	})
	t.Run("failed", func(t *testing.T) {
		s := setUp(t)
		injected := errors.New("injected failure")
		s.afterPasswordPut = func() error { return injected }
		if n, err := s.SetPasswordEndAccess("root", "new", at, "s2"); !errors.Is(err, injected) || n != 0 {
			t.Fatalf("SetPasswordEndAccess: %d tokens, %v; want 0 and the injected failure", n, err)
		}
		if u, _ := s.Admin("root"); u.PasswordHash != "old" {
			t.Errorf("password after the failure: %q, want the old one", u.PasswordHash)
		}
		if d := cmp.Diff([]string{"s1", "s2", "s3", "t1", "t2", "t3"}, accessLeft(t, s)); d != "" {
			t.Errorf("sessions and tokens left after the failure (-want +got):\n%s", d)
		}
	})
	t.Run("no account", func(t *testing.T) {
		s := setUp(t)
		if _, err := s.SetPasswordEndAccess("eve", "new", at, ""); !errors.Is(err, ErrNotFound) {
			t.Errorf("SetPasswordEndAccess of a missing account: %v, want ErrNotFound", err)
		}
		if _, err := s.Admin("eve"); !errors.Is(err, ErrNotFound) {
			t.Errorf("missing account after SetPasswordEndAccess: %v, want still missing", err)
		}
	})
}

// RecoverAdmin sets the password, makes the account an admin (creating
// it if missing) and ends all its sessions and tokens, in one
// transaction: a failure leaves all as it was.
func TestRecoverAdmin(t *testing.T) {
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s, _ := open(t)
	if err := s.AddAdmin(AdminUser{Name: "ann", Role: "admin", PasswordHash: "ann's"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddAdmin(AdminUser{Name: "root", Role: "viewer", PasswordHash: "old", Created: at.Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []Session{{Hash: "s1", User: "root"}, {Hash: "s2", User: "root"}, {Hash: "s3", User: "ann"}} {
		s.PutSession(x)
	}
	for _, x := range []APIToken{{Hash: "t1", ID: "i1", User: "root"}, {Hash: "t3", ID: "i3", User: "ann"}} {
		s.PutAPIToken(x)
	}
	injected := errors.New("injected failure")
	s.afterPasswordPut = func() error { return injected }
	if _, err := s.RecoverAdmin("root", "new", at); !errors.Is(err, injected) {
		t.Fatalf("RecoverAdmin: %v, want the injected failure", err)
	}
	if _, err := s.RecoverAdmin("eve", "new", at); !errors.Is(err, injected) {
		t.Fatalf("RecoverAdmin of a new account: %v, want the injected failure", err)
	}
	if u, _ := s.Admin("root"); u.PasswordHash != "old" || u.Role != "viewer" {
		t.Errorf("account after the failure: %+v, want as it was", u)
	}
	if _, err := s.Admin("eve"); !errors.Is(err, ErrNotFound) {
		t.Errorf("account eve after the failure: %v, want none", err)
	}
	if d := cmp.Diff([]string{"s1", "s2", "s3", "t1", "t3"}, accessLeft(t, s)); d != "" {
		t.Errorf("sessions and tokens left after the failure (-want +got):\n%s", d)
	}

	s.afterPasswordPut = nil
	if n, err := s.RecoverAdmin("root", "new", at); err != nil || n != 1 {
		t.Fatalf("RecoverAdmin: %d tokens, %v; want 1, nil", n, err)
	}
	want := AdminUser{Name: "root", Role: "admin", PasswordHash: "new", Created: at.Add(-time.Hour), PasswordSet: at}
	if u, _ := s.Admin("root"); !cmp.Equal(want, u) {
		t.Errorf("recovered account (-want +got):\n%s", cmp.Diff(want, u))
	}
	if d := cmp.Diff([]string{"s3", "t3"}, accessLeft(t, s)); d != "" {
		t.Errorf("sessions and tokens left (-want +got):\n%s", d)
	}
	if _, err := s.RecoverAdmin("eve", "new", at); err != nil {
		t.Fatal(err)
	}
	want = AdminUser{Name: "eve", Role: "admin", PasswordHash: "new", Created: at, PasswordSet: at}
	if u, _ := s.Admin("eve"); !cmp.Equal(want, u) {
		t.Errorf("account made by recovery (-want +got):\n%s", cmp.Diff(want, u))
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

// DeleteExpiredExpected deletes the announced devices whose code has
// expired, returns them without their codes, keeps the others, and writes
// nothing when none has expired.
func TestDeleteExpiredExpected(t *testing.T) {
	s, _ := open(t)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for _, e := range []ExpectedDevice{
		{Name: "old", Code: "AAAA-BBBB", Created: now.Add(-25 * time.Hour), Expires: now.Add(-time.Hour)},
		{Name: "due", Code: "CCCC-DDDD", Created: now.Add(-24 * time.Hour), Expires: now},
		{Name: "live", Code: "EEEE-FFFF", Created: now, Expires: now.Add(time.Second)},
	} {
		if _, err := s.ExpectDevice(e); err != nil {
			t.Fatal(err)
		}
	}
	gone, err := s.DeleteExpiredExpected(now)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range gone {
		if e.Code != "" {
			t.Errorf("%s returned with its code", e.Name)
		}
		names = append(names, e.Name)
	}
	slices.Sort(names)
	if d := cmp.Diff([]string{"due", "old"}, names); d != "" {
		t.Errorf("deleted (-want +got):\n%s", d)
	}
	left, err := s.ExpectedDevices()
	if err != nil || len(left) != 1 || left[0].Name != "live" || left[0].Code != "EEEE-FFFF" {
		t.Errorf("left %+v, %v; want live with its code", left, err)
	}
	tx := lastTx(t, s)
	if gone, err := s.DeleteExpiredExpected(now); err != nil || len(gone) != 0 {
		t.Errorf("again: %+v, %v; want nothing", gone, err)
	}
	if got := lastTx(t, s); got != tx {
		t.Errorf("with nothing expired transaction %d was committed (last was %d), want no write", got, tx)
	}
}

// TestUnreadableRulesNamed: a forwarding rule record that does not decode
// makes ForwardRules fail (the gateway holds the link on it), with an
// error naming its id, which DeleteForwardRule removes, and the rules that
// decode returned with it. Before, the error was the JSON decoder's alone
// and no rule came with it: the console could show neither.
func TestUnreadableRulesNamed(t *testing.T) {
	s, _ := open(t)
	if _, err := s.PutForwardRule(ForwardRule{Topic: "devices/+/t/a", Action: "forward"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"r98", "r99"} {
		if err := s.update(bRules, func(b *bolt.Bucket) error { return b.Put([]byte(id), []byte("{not json")) }); err != nil {
			t.Fatal(err)
		}
	}
	rs, err := s.ForwardRules()
	var bad *UnreadableRulesError
	if !errors.As(err, &bad) {
		t.Fatalf("ForwardRules with two bad records: %v, want an *UnreadableRulesError", err)
	}
	if d := cmp.Diff([]string{"r98", "r99"}, bad.IDs); d != "" {
		t.Errorf("bad ids (-want +got):\n%s", d)
	}
	for _, want := range []string{`"r98", "r99"`, "does not decode", "delete it"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q, want it to say %q", err, want)
		}
	}
	if len(rs) != 1 || rs[0].Topic != "devices/+/t/a" {
		t.Errorf("rules with the error: %+v, want the one that decodes", rs)
	}
	for _, id := range bad.IDs {
		if err := s.DeleteForwardRule(id); err != nil {
			t.Fatalf("DeleteForwardRule(%s): %v", id, err)
		}
	}
	if rs, err := s.ForwardRules(); err != nil || len(rs) != 1 {
		t.Errorf("ForwardRules after the bad records were deleted: %+v, %v; want the one rule", rs, err)
	}
}

// TestRuleWhoseIDIsNotItsKeyNamed: a rule record that decodes but whose id
// is empty or not its key is named by its key, as an unreadable record:
// the console deletes rules by id, and listed as a rule such a record had
// a Delete that deleted nothing (or another rule), so it could never be
// taken out, and the link applied it for good. A rule saved for its topic
// is written under a key of its own, not under the record's id.
func TestRuleWhoseIDIsNotItsKeyNamed(t *testing.T) {
	s, _ := open(t)
	kept, err := s.PutForwardRule(ForwardRule{Topic: "devices/+/t/a", Action: "forward"})
	if err != nil {
		t.Fatal(err)
	}
	for key, raw := range map[string]string{
		"r98": `{"id":"","topic":"devices/+/t/x","action":"local"}`,
		"r99": `{"id":"` + kept.ID + `","topic":"devices/+/t/y","action":"local"}`,
	} {
		if err := s.update(bRules, func(b *bolt.Bucket) error { return b.Put([]byte(key), []byte(raw)) }); err != nil {
			t.Fatal(err)
		}
	}
	rs, err := s.ForwardRules()
	var bad *UnreadableRulesError
	if !errors.As(err, &bad) {
		t.Fatalf("ForwardRules with records whose id is not their key: %v, want an *UnreadableRulesError", err)
	}
	if d := cmp.Diff([]string{"r98", "r99"}, bad.IDs); d != "" {
		t.Errorf("bad ids (-want +got):\n%s", d)
	}
	if want := `record "r98", "r99" in the store does not decode as a rule (its id is "", not its key "r98")`; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q, want it to say %q", err, want)
	}
	if len(rs) != 1 || rs[0].ID != kept.ID {
		t.Errorf("rules with the error: %+v, want %s alone", rs, kept.ID)
	}
	// r99 claims kept's id: a rule for its topic overwrote kept.
	x, err := s.PutForwardRule(ForwardRule{Topic: "devices/+/t/y", Action: "forward"})
	if err != nil {
		t.Fatal(err)
	}
	if x.ID == kept.ID || x.ID == "r99" {
		t.Errorf("a rule for the bad record's topic saved as %q, want a key of its own", x.ID)
	}
	for _, id := range bad.IDs {
		if err := s.DeleteForwardRule(id); err != nil {
			t.Fatalf("DeleteForwardRule(%s): %v", id, err)
		}
	}
	rs, err = s.ForwardRules()
	var got []string
	for _, r := range rs {
		got = append(got, r.ID+" "+r.Topic+" "+r.Action)
	}
	if d := cmp.Diff([]string{kept.ID + " devices/+/t/a forward", x.ID + " devices/+/t/y forward"}, got); err != nil || d != "" {
		t.Errorf("ForwardRules after the bad records were deleted: %v (-want +got):\n%s", err, d)
	}
}

package store

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestFirmwareStatusesSurviveReopenAndDelete(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	// A store from before this bucket existed reads as empty.
	if got, err := s.FirmwareStatuses(); err != nil || len(got) != 0 {
		t.Fatalf("fresh store: %v %v, want nothing", got, err)
	}
	if _, err := s.FirmwareStatus("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("fresh store FirmwareStatus: %v, want ErrNotFound", err)
	}
	if err := s.PutFirmwareStatuses(map[string][]byte{"a": []byte(`{"state":"verified"}`), "b": []byte(`{"state":"failed"}`)}); err != nil {
		t.Fatal(err)
	}
	if err := s.PutFirmwareStatuses(map[string][]byte{"a": []byte(`{"state":"installed"}`), "b": nil, "c": []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, err := s.FirmwareStatuses()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": `{"state":"installed"}`, "c": `{}`}
	gotS := map[string]string{}
	for k, v := range got {
		gotS[k] = string(v)
	}
	if d := cmp.Diff(want, gotS); d != "" {
		t.Errorf("statuses after reopen (-want +got):\n%s", d)
	}
	if err := s.DeleteFirmwareStatus("a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FirmwareStatus("a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted status: %v, want ErrNotFound", err)
	}
	// Deleting what is not there writes nothing (flash wear).
	st := s.db.Stats()
	before := st.TxStats.GetWrite()
	if err := s.DeleteFirmwareStatus("nobody"); err != nil {
		t.Fatal(err)
	}
	st = s.db.Stats()
	if after := st.TxStats.GetWrite(); after != before {
		t.Errorf("deleting an absent status wrote %d page(s), want 0", after-before)
	}
	if err := s.Check(); err != nil {
		t.Error(err)
	}
}

// While the opt-out is on, every value of PutFirmwareStatusesUnless is a
// delete; with it off, values are written.
func TestFirmwareStatusesUnlessOptedOut(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.PutFirmwareStatusesUnless("fw", map[string][]byte{"a": []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.FirmwareStatus("a"); err != nil {
		t.Errorf("written with the opt-out off: %v", err)
	}
	s.SetOptOut("fw", true)
	if err := s.PutFirmwareStatusesUnless("fw", map[string][]byte{"b": []byte(`{}`), "a": []byte(`{"state":"installed"}`)}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.FirmwareStatuses(); err != nil || len(got) != 0 {
		t.Errorf("after a write with the opt-out on: %q %v, want nothing stored", got, err)
	}
}

package console

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/gateway/store"
)

// retainGateway is stubGateway with a device's retained messages dropped.
type retainGateway struct{ stubGateway }

func (retainGateway) DropRetained(context.Context, string) (int, error) { return 0, nil }

// fakeQueues is an Upstream with UpstreamQueues.
type fakeQueues struct {
	dropped *[]string
	err     error
}

func (fakeQueues) Show(context.Context) (Report, error) { return Report{}, nil }
func (fakeQueues) DeviceMessages(context.Context, string, int, int) (UpstreamMessages, error) {
	return UpstreamMessages{}, nil
}
func (f fakeQueues) DropDevice(_ context.Context, device string) (int, int, error) {
	*f.dropped = append(*f.dropped, device)
	if f.err != nil {
		return 1, 1, f.err
	}
	return 2, 1, nil
}

// An erase deletes the device's queued and parked upstream messages and
// audits how many; one that fails there is audited with what it did.
func TestEraseDropsUpstreamMessages(t *testing.T) {
	for _, fail := range []bool{false, true} {
		st, err := store.Open(filepath.Join(t.TempDir(), "s.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		h, err := NewHandler(Options{Store: st, Gateway: retainGateway{}})
		if err != nil {
			t.Fatal(err)
		}
		var dropped []string
		q := fakeQueues{dropped: &dropped}
		if fail {
			q.err = errors.New("disk gone")
		}
		h.SetComponents(Components{Upstream: q})
		if err := st.AddDevice(store.Device{ID: "dev-a", Name: "a", Revoked: true}); err != nil {
			t.Fatal(err)
		}
		err = h.eraseDevice(context.Background(), &principal{user: "root", remote: "192.0.2.1"}, "dev-a")
		if fail != (err != nil) || len(dropped) != 1 || dropped[0] != "dev-a" {
			t.Fatalf("erase (DropDevice failing: %v) = %v, dropped %q; want dev-a's dropped", fail, err, dropped)
		}
		evs, err := st.AuditLog(1, 0)
		if err != nil || len(evs) != 1 {
			t.Fatalf("audit log: %+v %v", evs, err)
		}
		want := "2 queued and 1 parked upstream message(s) deleted"
		if fail {
			want = "erase stopped: deleting the queued and parked upstream messages failed (disk gone); done: revoked, device record, firmware status and 0 retained MQTT message(s) deleted, 1 queued and 1 parked"
		}
		if e := evs[0]; e.Action != "privacy.erase" || e.Target != "dev-a" || !strings.Contains(e.Detail, want) {
			t.Errorf("audit event %+v, want privacy.erase of dev-a saying %q", e, want)
		}
	}
}

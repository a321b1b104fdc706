package gateway

import (
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// failingStatusStore is a firmware status store whose writes fail while
// fail is set.
type failingStatusStore struct {
	mu   sync.Mutex
	fail error
}

func (s *failingStatusStore) FirmwareStatuses() (map[string][]byte, error) {
	return map[string][]byte{}, nil
}

func (s *failingStatusStore) PutFirmwareStatuses(map[string][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fail
}

// oneDevice is the firmware cache's view of the devices: d1 alone.
type oneDevice struct{}

func (oneDevice) Device(id string) (otacache.DeviceInfo, bool) {
	return otacache.DeviceInfo{Class: otacache.Class{Vendor: "acme", Model: "s1"}}, id == "d1"
}

func (oneDevice) Classes() ([]otacache.Class, error) {
	return []otacache.Class{{Vendor: "acme", Model: "s1"}}, nil
}

// TestMQTTStatusNotStoredIsNotRefused: a status report published over
// MQTT that the cache takes but cannot store (the gateway's store fails)
// is logged as not stored, the gateway's fault, and not counted as a
// refusal; it was logged as "refused", which reads as the device's fault.
// A report that is the device's fault is still logged and counted as
// refused.
func TestMQTTStatusNotStoredIsNotRefused(t *testing.T) {
	repo := tufrepo.New(t)
	st := &failingStatusStore{fail: errors.New("disk full (test)")}
	fw, err := otacache.New(otacache.Config{RepositoryURL: repo.URL(), TrustedRoot: repo.RootJSON(), StateDir: t.TempDir(), StatusStore: st}, oneDevice{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	lb := &logbuf.Buffer{}
	g := &Gateway{log: slog.New(slog.NewTextHandler(lb, nil)), firmware: fw}

	g.firmwareStatusMirror(bridges.Message{Device: "d1", Topic: statusTopic("d1"), Payload: []byte(`{"state":"downloading"}`)})
	if l := lb.Lines("mqtt status report"); len(l) != 1 || !strings.Contains(l[0], "taken but not stored") || !strings.Contains(l[0], "device=d1") || strings.Contains(l[0], "refused") {
		t.Errorf("log for a report not stored: %q; want one line saying it was taken but not stored, with the device, not refused", l)
	}
	if n := fw.Status().Counters.StatusRefused; n != 0 {
		t.Errorf("StatusRefused = %d after a report not stored, want 0 (the device did nothing wrong)", n)
	}

	g.firmwareStatusMirror(bridges.Message{Device: "d1", Topic: statusTopic("d1"), Payload: []byte(`{"state":"rebooting"}`)})
	if l := lb.Lines("mqtt status report refused"); len(l) != 1 || !strings.Contains(l[0], "device=d1") {
		t.Errorf("log for a bad report: %q; want one line saying it was refused, with the device", l)
	}
	if n := fw.Status().Counters.StatusRefused; n != 1 {
		t.Errorf("StatusRefused = %d after a bad report, want 1", n)
	}
}

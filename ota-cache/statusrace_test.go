package otacache

import (
	"sync"
	"testing"
)

// erasingDevices is the device registry with an erase slipped in: once
// armed, the next lookup of a device answers what the registry held, then,
// before it returns, runs erase (which revokes the device and forgets its
// status, as the console's erase does).
type erasingDevices struct {
	*fakeDevices
	mu    sync.Mutex
	erase func(id string)
}

func (d *erasingDevices) arm(erase func(id string)) {
	d.mu.Lock()
	d.erase = erase
	d.mu.Unlock()
}

func (d *erasingDevices) Device(id string) (DeviceInfo, bool) {
	info, ok := d.fakeDevices.Device(id)
	d.mu.Lock()
	erase := d.erase
	d.erase = nil
	d.mu.Unlock()
	if erase != nil {
		erase(id)
	}
	return info, ok
}

// A status report whose enrollment check passed just before the device's
// data was erased (revoked, then ForgetDevice) does not bring the status
// back, in memory or in the store: the check is made again under the lock
// ForgetDevice takes. Before, the report was written after the erase.
func TestStatusReportRacingAnEraseStaysErased(t *testing.T) {
	f := newFixture(t)
	st := &memStatusStore{m: map[string][]byte{}}
	cfg := f.config()
	cfg.StatusStore = st
	devs := &erasingDevices{fakeDevices: f.devices}
	c, err := New(cfg, devs, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.ReportStatus("dev-a", DeviceStatus{State: StateDownloading}); err != nil {
		t.Fatal(err)
	}
	var forgetErr error
	devs.arm(func(id string) {
		f.devices.remove(id)
		forgetErr = c.ForgetDevice(id)
	})
	err = c.ReportStatus("dev-a", DeviceStatus{State: StateFailed, Detail: "verification failed"})
	if forgetErr != nil {
		t.Fatalf("ForgetDevice: %v", forgetErr)
	}
	if err == nil {
		t.Error("a report from a device erased meanwhile was taken, want it refused")
	}
	if got, ok := c.DeviceStatuses()["dev-a"]; ok {
		t.Errorf("after the erase the cache holds dev-a's status %+v", got)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if v, ok := st.m["dev-a"]; ok {
		t.Errorf("after the erase the store holds dev-a's status %s", v)
	}
}

package otacache

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// memStatusStore is the gateway store as the cache sees it, counting the
// transactions it is asked for. block, if set, holds the next
// PutFirmwareStatuses until it is closed.
type memStatusStore struct {
	mu      sync.Mutex
	m       map[string][]byte
	batches []map[string][]byte
	block   chan struct{}
	entered chan struct{} // closed when the blocked write has begun
	fail    error
}

func (s *memStatusStore) FirmwareStatuses() (map[string][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.m), nil
}

func (s *memStatusStore) PutFirmwareStatuses(b map[string][]byte) error {
	s.mu.Lock()
	block := s.block
	s.block = nil
	s.mu.Unlock()
	if block != nil {
		close(s.entered)
		<-block
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail != nil {
		return s.fail
	}
	s.batches = append(s.batches, maps.Clone(b))
	for k, v := range b {
		if v == nil {
			delete(s.m, k)
		} else {
			s.m[k] = v
		}
	}
	return nil
}

func (s *memStatusStore) nBatches() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.batches)
}

func withoutAt(m map[string]DeviceStatus) map[string]DeviceStatus {
	out := map[string]DeviceStatus{}
	for k, v := range m {
		v.At = time.Time{}
		out[k] = v
	}
	return out
}

func TestStatusReportsSurviveRestartAndAreWrittenOnlyWhenChanged(t *testing.T) {
	f := newFixture(t)
	imgA := testImage(4000, 1)
	_, shaA := f.repo.addImage(classA, "1.1.0", 7, imgA)
	f.repo.publish()
	st := &memStatusStore{m: map[string][]byte{}}
	cfg := f.config()
	cfg.StatusStore = st
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Offer("dev-a"); !ok {
		t.Fatal("no offer for dev-a")
	}
	report := func(dev string, s DeviceStatus) {
		t.Helper()
		if err := c.ReportStatus(dev, s); err != nil {
			t.Fatal(err)
		}
	}
	report("dev-a", DeviceStatus{State: StateDownloading, Version: "1.1.0", SHA256: shaA})
	report("dev-a", DeviceStatus{State: StateDownloading, Version: "1.1.0", SHA256: shaA}) // the same again
	f.clock.Add(time.Minute)
	report("dev-a", DeviceStatus{State: StateDownloading, Version: "1.1.0", SHA256: shaA}) // and later
	if n := st.nBatches(); n != 1 {
		t.Errorf("three identical reports: %d store writes, want 1", n)
	}
	report("dev-a", DeviceStatus{State: StateInstalled, Version: "1.1.0", SHA256: shaA})
	report("dev-b", DeviceStatus{State: StateFailed, Version: "2.0", Detail: "verification failed"})
	if n := st.nBatches(); n != 3 {
		t.Errorf("two changes after that: %d store writes in all, want 3", n)
	}
	if _, ok := c.Offer("dev-a"); ok {
		t.Error("offered again after installed")
	}
	before := withoutAt(c.DeviceStatuses())
	c.Close()

	// Restart: the same state directory and store.
	c2, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if d := cmp.Diff(before, withoutAt(c2.DeviceStatuses())); d != "" {
		t.Errorf("statuses after restart (-want +got):\n%s", d)
	}
	// The installed report still counts: 1.1.0 is not offered again, though
	// the gateway's own record of dev-a still says 1.0.0.
	if o, ok := c2.Offer("dev-a"); ok {
		t.Errorf("after restart dev-a (installed 1.1.0) was offered %+v", o)
	}

	// Erasing the device's data deletes it from memory and the store.
	if err := c2.ForgetDevice("dev-b"); err != nil {
		t.Fatal(err)
	}
	if _, ok := c2.DeviceStatuses()["dev-b"]; ok {
		t.Error("dev-b's status still in memory after ForgetDevice")
	}
	if _, ok := st.m["dev-b"]; ok {
		t.Error("dev-b's status still in the store after ForgetDevice")
	}
	n := st.nBatches()
	if err := c2.ForgetDevice("dev-b"); err != nil || st.nBatches() != n {
		t.Errorf("forgetting again: err %v, %d more writes; want nil and 0", err, st.nBatches()-n)
	}
}

func TestStatusReportsAreGroupCommitted(t *testing.T) {
	f := newFixture(t)
	const n = 40
	devs := map[string]DeviceInfo{}
	for i := range n {
		devs[fmt.Sprintf("d%02d", i)] = DeviceInfo{Class: classA, Version: "1.0"}
	}
	f.devices = newFakeDevices(devs)
	release := make(chan struct{})
	st := &memStatusStore{m: map[string][]byte{}, block: release, entered: make(chan struct{})}
	cfg := f.config()
	cfg.StatusStore = st
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	errs := make(chan error, n)
	// The first report's write is held in the store...
	go func() { errs <- c.ReportStatus("d00", DeviceStatus{State: StateDownloading}) }()
	select {
	case <-st.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("first report never reached the store")
	}
	deadline := time.Now().Add(10 * time.Second)
	// ...while the other devices report.
	for i := 1; i < n; i++ {
		go func() {
			errs <- c.ReportStatus(fmt.Sprintf("d%02d", i), DeviceStatus{State: StateVerified, Version: "1.1"})
		}()
	}
	for c.sw.queued() != n-1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d reports queued behind the first, want %d", c.sw.queued(), n-1)
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	st.mu.Lock()
	sizes := []int{}
	for _, b := range st.batches {
		sizes = append(sizes, len(b))
	}
	stored := len(st.m)
	st.mu.Unlock()
	if d := cmp.Diff([]int{1, n - 1}, sizes); d != "" {
		t.Errorf("store transactions for %d reports, by size (-want +got):\n%s", n, d)
	}
	if stored != n {
		t.Errorf("%d statuses stored, want %d", stored, n)
	}
}

func TestStatusReportNotStoredIsAnError(t *testing.T) {
	f := newFixture(t)
	boom := errors.New("disk full")
	st := &memStatusStore{m: map[string][]byte{}, fail: boom}
	cfg := f.config()
	cfg.StatusStore = st
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.ReportStatus("dev-a", DeviceStatus{State: StateDownloading})
	if !errors.Is(err, errStatusNotStored) || !errors.Is(err, boom) {
		t.Errorf("report with a failing store: %v, want errStatusNotStored wrapping %v", err, boom)
	}
	// The store recovers: the same report again is written this time,
	// though it says nothing new.
	st.mu.Lock()
	st.fail = nil
	st.mu.Unlock()
	if err := c.ReportStatus("dev-a", DeviceStatus{State: StateDownloading}); err != nil {
		t.Fatal(err)
	}
	if _, ok := st.m["dev-a"]; !ok || st.nBatches() != 1 {
		t.Errorf("after the store recovered: stored %v, %d writes; want dev-a in 1 write", ok, st.nBatches())
	}
	if err := c.ReportStatus("dev-a", DeviceStatus{State: StateDownloading}); err != nil || st.nBatches() != 1 {
		t.Errorf("then the same again: err %v, %d writes; want 1", err, st.nBatches())
	}
}

func (w *statusWriter) queued() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.pending)
}

// gatedStore holds every write until the test releases it, and shows the
// test each batch as its write begins.
type gatedStore struct {
	entered chan map[string][]byte
	release chan struct{}
}

func (s *gatedStore) FirmwareStatuses() (map[string][]byte, error) { return nil, nil }

func (s *gatedStore) PutFirmwareStatuses(b map[string][]byte) error {
	s.entered <- maps.Clone(b)
	<-s.release
	return nil
}

// TestStatusWriterReturnsOnceItsBatchIsStored: a report returns once its
// own change is stored, even while reports that arrived during its write
// are being written: whoever waits for those writes them.
func TestStatusWriterReturnsOnceItsBatchIsStored(t *testing.T) {
	f := newFixture(t)
	st := &gatedStore{entered: make(chan map[string][]byte), release: make(chan struct{})}
	cfg := f.config()
	cfg.StatusStore = st
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	batch := func(what string) map[string][]byte {
		t.Helper()
		select {
		case b := <-st.entered:
			return b
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no write began within 10s", what)
			return nil
		}
	}
	errA, errB := make(chan error, 1), make(chan error, 1)
	go func() { errA <- c.ReportStatus("dev-a", DeviceStatus{State: StateDownloading}) }()
	if b := batch("dev-a's report"); len(b) != 1 || b["dev-a"] == nil {
		t.Fatalf("first write %v, want dev-a's report alone", b)
	}
	// dev-b reports while dev-a's write is in flight.
	go func() { errB <- c.ReportStatus("dev-b", DeviceStatus{State: StateDownloading}) }()
	deadline := time.Now().Add(10 * time.Second)
	for c.sw.queued() != 1 {
		if time.Now().After(deadline) {
			t.Fatal("dev-b's report not queued behind dev-a's write")
		}
		time.Sleep(time.Millisecond)
	}
	st.release <- struct{}{}
	if b := batch("dev-b's report"); len(b) != 1 || b["dev-b"] == nil {
		t.Fatalf("second write %v, want dev-b's report alone", b)
	}
	// dev-b's write is held: dev-a's report, stored, returns all the same.
	aDone := false
	select {
	case err := <-errA:
		aDone = true
		if err != nil {
			t.Errorf("dev-a's report: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("dev-a's report did not return while dev-b's write was in flight")
	}
	st.release <- struct{}{}
	if err := <-errB; err != nil {
		t.Errorf("dev-b's report: %v", err)
	}
	if !aDone {
		<-errA
	}
}

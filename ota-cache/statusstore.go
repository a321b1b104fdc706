package otacache

import (
	"encoding/json"
	"errors"
	"fmt"
	"sync"
)

// StatusStore persists the latest update status of each device, so that
// the console still shows it, and an "installed" report still counts,
// after a restart. The gateway's bbolt store implements it. Values are the
// JSON of DeviceStatus; a nil value in a batch deletes that device's entry.
type StatusStore interface {
	FirmwareStatuses() (map[string][]byte, error)
	// PutFirmwareStatuses writes a batch in one transaction.
	PutFirmwareStatuses(batch map[string][]byte) error
}

// errStatusNotStored marks a status report that was taken but could not be
// written to the StatusStore (the transport answers a server error, not a
// bad request: the device did nothing wrong).
var errStatusNotStored = errors.New("status report not stored")

// StatusNotStored reports whether err, from ReportStatus, says the report
// was taken (it is shown, and written with the device's next report) but
// could not be stored: the gateway's fault, not the device's. A transport
// that takes reports itself logs it as such, not as a refusal.
func StatusNotStored(err error) bool { return errors.Is(err, errStatusNotStored) }

// sameReport reports whether two reports say the same thing (only the
// arrival time differs): a device repeating itself costs no flash write.
func (st DeviceStatus) sameReport(o DeviceStatus) bool {
	return st.State == o.State && st.Version == o.Version && st.SHA256 == o.SHA256 && st.Detail == o.Detail
}

// loadStatuses reads the persisted reports at start. An entry that no
// longer parses is skipped with a warning (never fatal: status is for
// the console, not for trust decisions beyond "do not offer again").
func (c *Cache) loadStatuses() error {
	if c.cfg.StatusStore == nil {
		return nil
	}
	all, err := c.cfg.StatusStore.FirmwareStatuses()
	if err != nil {
		return err
	}
	for dev, b := range all {
		var st DeviceStatus
		if err := json.Unmarshal(b, &st); err != nil {
			c.log.Warn("stored firmware status unreadable, skipped", "device", dev, "err", err)
			continue
		}
		if err := st.validate(); err != nil {
			c.log.Warn("stored firmware status invalid, skipped", "device", dev, "err", err)
			continue
		}
		c.statuses[dev] = st
	}
	return nil
}

// statusWriter writes status changes to the StatusStore with group
// commit: a report waits until its change is stored, and changes that
// arrive while a write is in flight go together in the next transaction,
// so a burst of reports (a whole class finishing an update) costs a few
// fsyncs, not one per device. It starts no goroutine: one of the callers
// waiting for a batch writes it, and returns once it is stored; the
// callers waiting for the next batch then write that one. (A caller that
// kept writing until nothing was queued could be kept from returning for
// as long as devices kept reporting, and it may be another device's
// request or the console's ForgetDevice.)
type statusWriter struct {
	st StatusStore

	mu      sync.Mutex
	written *sync.Cond        // on mu: a write ended
	pending map[string][]byte // device → JSON, nil = delete
	next    *statusBatch      // the batch pending changes will be written in
	writing bool
}

type statusBatch struct {
	stored bool // written (err says how)
	err    error
}

func newStatusWriter(st StatusStore) *statusWriter {
	w := &statusWriter{st: st, pending: map[string][]byte{}, next: &statusBatch{}}
	w.written = sync.NewCond(&w.mu)
	return w
}

// enqueue records a change and returns the batch that will carry it. The
// caller holds the cache's lock, so changes to one device are queued in
// the order they were made in memory.
func (w *statusWriter) enqueue(device string, v []byte) *statusBatch {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.pending[device] = v
	return w.next
}

// wait returns once b is written, writing it if no one else is.
func (w *statusWriter) wait(b *statusBatch) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for !b.stored {
		if w.writing {
			w.written.Wait()
			continue
		}
		// Batches are written in order and b is not in flight: b is
		// w.next, holding what is pending.
		items := w.pending
		w.pending, w.next = map[string][]byte{}, &statusBatch{}
		w.writing = true
		w.mu.Unlock()
		err := w.st.PutFirmwareStatuses(items)
		w.mu.Lock()
		b.stored, b.err = true, err
		w.writing = false
		w.written.Broadcast()
	}
	return b.err
}

// ForgetDevice deletes what the cache holds about a device (its status
// report, in memory and in the StatusStore): the device's data was erased.
func (c *Cache) ForgetDevice(device string) error {
	c.mu.Lock()
	_, had := c.statuses[device]
	delete(c.statuses, device)
	var b *statusBatch
	if had && c.sw != nil {
		b = c.sw.enqueue(device, nil)
	}
	c.mu.Unlock()
	if b == nil {
		return nil
	}
	if err := c.sw.wait(b); err != nil {
		return fmt.Errorf("delete the firmware status of %q: %w", device, err)
	}
	return nil
}

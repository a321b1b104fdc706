package store

import (
	"fmt"
	"maps"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// bFWStatus holds each device's latest firmware update status report, by
// device id. Values are opaque to the store (the firmware cache's JSON).
// The bucket is made on first write so older stores need no migration.
var bFWStatus = []byte("fwstatus")

// PutFirmwareStatuses writes a batch of device firmware statuses in one
// transaction (one fsync however many devices reported at once). A nil
// value deletes that device's status.
func (s *Store) PutFirmwareStatuses(batch map[string][]byte) error {
	return s.PutFirmwareStatusesUnless("", batch)
}

// PutFirmwareStatusesUnless is PutFirmwareStatuses, but while the privacy
// opt-out optOut is on (SetOptOut) every value is a delete. The opt-out is
// read in the write's own transaction: a report read as allowed before an
// opt-out, and written after the opt-out erased the stored ones, would be
// kept against it. "" is no opt-out.
func (s *Store) PutFirmwareStatusesUnless(optOut string, batch map[string][]byte) error {
	if len(batch) == 0 {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bFWStatus)
		if err != nil {
			return err
		}
		off := false
		if o := tx.Bucket(bOptOut); o != nil && optOut != "" {
			off = o.Get([]byte(optOut)) != nil
		}
		for _, id := range slices.Sorted(maps.Keys(batch)) {
			if v := batch[id]; v == nil || off {
				err = b.Delete([]byte(id))
			} else {
				err = b.Put([]byte(id), v)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store firmware status of %d device(s): %w", len(batch), err)
	}
	return nil
}

// FirmwareStatuses returns every stored device firmware status, by device.
func (s *Store) FirmwareStatuses() (map[string][]byte, error) {
	out := map[string][]byte{}
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bFWStatus)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			out[string(k)] = slices.Clone(v)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read firmware statuses: %w", err)
	}
	return out, nil
}

// FirmwareStatus returns one device's stored firmware status, or
// ErrNotFound.
func (s *Store) FirmwareStatus(id string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bFWStatus); b != nil {
			out = slices.Clone(b.Get([]byte(id)))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read firmware status of %s: %w", id, err)
	}
	if out == nil {
		return nil, fmt.Errorf("firmware status of %s: %w", id, ErrNotFound)
	}
	return out, nil
}

// DeleteFirmwareStatus removes a device's firmware status, if any (device
// data erased). It writes nothing when there is none.
func (s *Store) DeleteFirmwareStatus(id string) error {
	if _, err := s.FirmwareStatus(id); err != nil {
		return nil
	}
	return s.PutFirmwareStatuses(map[string][]byte{id: nil})
}

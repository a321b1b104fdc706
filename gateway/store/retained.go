package store

import (
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// bRetained holds the MQTT broker's retained messages, by topic. The
// bucket is made on first use so older stores need no migration.
var bRetained = []byte("retained")

// PutRetained stores the retained message of topic (value is opaque).
func (s *Store) PutRetained(topic string, value []byte) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bRetained)
		if err != nil {
			return err
		}
		return b.Put([]byte(topic), value)
	})
	if err != nil {
		return fmt.Errorf("store retained message on %q: %w", topic, err)
	}
	return nil
}

// DeleteRetained removes the retained message of topic, if any.
func (s *Store) DeleteRetained(topic string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bRetained)
		if b == nil {
			return nil
		}
		return b.Delete([]byte(topic))
	})
	if err != nil {
		return fmt.Errorf("delete retained message on %q: %w", topic, err)
	}
	return nil
}

// ForEachRetained calls fn for every retained message. value is only valid
// during the call.
func (s *Store) ForEachRetained(fn func(topic string, value []byte) error) error {
	return s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bRetained)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error { return fn(string(k), v) })
	})
}

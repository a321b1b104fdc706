package store

import (
	"bytes"
	"fmt"
	"slices"

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

// DeleteRetained removes the retained messages of topics, those it holds,
// in one transaction. It writes nothing when topics is empty.
func (s *Store) DeleteRetained(topics ...string) error {
	if len(topics) == 0 {
		return nil
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bRetained)
		if b == nil {
			return nil
		}
		for _, t := range topics {
			if err := b.Delete([]byte(t)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		if len(topics) == 1 {
			return fmt.Errorf("delete retained message on %q: %w", topics[0], err)
		}
		return fmt.Errorf("delete %d retained messages (%q, ...): %w", len(topics), topics[0], err)
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

// RetainedUnder returns the retained messages whose topic starts with
// prefix (a device's: bridges.TopicPrefix), by topic.
func (s *Store) RetainedUnder(prefix string) (map[string][]byte, error) {
	out := map[string][]byte{}
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bRetained)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, v = c.Next() {
			out[string(k)] = slices.Clone(v)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read retained messages under %q: %w", prefix, err)
	}
	return out, nil
}

// DeleteRetainedUnder removes, in one transaction, every retained
// message whose topic starts with prefix and returns how many it removed.
// It writes nothing when there is none.
func (s *Store) DeleteRetainedUnder(prefix string) (int, error) {
	held, err := s.RetainedUnder(prefix)
	if err != nil || len(held) == 0 {
		return 0, err
	}
	n := 0
	err = s.db.Update(func(tx *bolt.Tx) error {
		n = 0
		b := tx.Bucket(bRetained)
		c := b.Cursor()
		var keys [][]byte
		for k, _ := c.Seek([]byte(prefix)); k != nil && bytes.HasPrefix(k, []byte(prefix)); k, _ = c.Next() {
			keys = append(keys, slices.Clone(k))
		}
		for _, k := range keys {
			if err := b.Delete(k); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("delete retained messages under %q: %w", prefix, err)
	}
	return n, nil
}

package otacache

import (
	"strconv"
	"testing"
	"time"
)

func TestResponseCacheBoundedReplay(t *testing.T) {
	c := NewResponseCache(4)
	if len(c.slots) != 0 {
		t.Fatalf("new cache holds %d slots, want none until used", len(c.slots))
	}
	raw := func(i int) []byte { return []byte("block " + strconv.Itoa(i)) }
	for i := range 6 {
		r := raw(i)
		c.store(uint16(i), r, time.Now())
		r[0] = 'X' // the cache keeps its own copy
	}
	// The last 4 are replayed byte for byte; older ones are gone.
	for i := range 6 {
		s, ok := c.load(uint16(i))
		if want := i >= 2; ok != want {
			t.Errorf("load(%d) found=%v, want %v", i, ok, want)
			continue
		}
		if !ok {
			continue
		}
		if got, err := s.answer(nil); err != nil || string(got) != string(raw(i)) {
			t.Errorf("load(%d) = %q, %v; want %q", i, got, err, raw(i))
		}
	}
	if len(c.slots) != 4 {
		t.Errorf("cache grew to %d slots, want 4", len(c.slots))
	}
	for i := range c.slots {
		c.slots[i].expires = time.Now().Add(-time.Second).UnixNano()
	}
	if _, ok := c.load(5); ok {
		t.Error("entry survived EXCHANGE_LIFETIME")
	}
}

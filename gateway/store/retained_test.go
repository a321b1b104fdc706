package store

import (
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// DeleteRetained takes several topics in one call (the broker's start
// deletes the empty records an earlier version stored that way), and
// DeleteRetainedUnder a device's prefix only: not a device whose id
// starts with the same letters.
func TestDeleteRetained(t *testing.T) {
	s, _ := open(t)
	if err := s.DeleteRetained("devices/d1/s/a"); err != nil {
		t.Errorf("delete from a store without retained messages: %v", err)
	}
	for _, topic := range []string{"devices/d1/s/a", "devices/d1/s/b", "devices/d1/t/c", "devices/d10/s/a", "devices/d2/s/a"} {
		if err := s.PutRetained(topic, []byte(topic)); err != nil {
			t.Fatal(err)
		}
	}
	held := func() []string {
		var out []string
		if err := s.ForEachRetained(func(topic string, _ []byte) error { out = append(out, topic); return nil }); err != nil {
			t.Fatal(err)
		}
		slices.Sort(out)
		return out
	}
	if err := s.DeleteRetained("devices/d1/s/a", "devices/d2/s/a", "devices/none"); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"devices/d1/s/b", "devices/d1/t/c", "devices/d10/s/a"}, held()); d != "" {
		t.Errorf("after DeleteRetained of two topics and one not held (-want +got):\n%s", d)
	}
	if err := s.DeleteRetained(); err != nil {
		t.Errorf("DeleteRetained of no topic: %v", err)
	}
	n, err := s.DeleteRetainedUnder("devices/d1/")
	if err != nil || n != 2 {
		t.Errorf("DeleteRetainedUnder(devices/d1/) = %d, %v; want 2", n, err)
	}
	if d := cmp.Diff([]string{"devices/d10/s/a"}, held()); d != "" {
		t.Errorf("after DeleteRetainedUnder (-want +got):\n%s", d)
	}
}

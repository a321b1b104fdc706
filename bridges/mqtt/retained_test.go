package mqtt

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/bridges/queue"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type mapStore map[string][]byte

func (m mapStore) PutRetained(t string, v []byte) error { m[t] = append([]byte(nil), v...); return nil }
func (m mapStore) DeleteRetained(ts ...string) error {
	for _, t := range ts {
		delete(m, t)
	}
	return nil
}
func (m mapStore) DeleteRetainedUnder(prefix string) (int, error) {
	n := 0
	for t := range m {
		if strings.HasPrefix(t, prefix) {
			delete(m, t)
			n++
		}
	}
	return n, nil
}
func (m mapStore) ForEachRetained(fn func(string, []byte) error) error {
	for k, v := range m {
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return nil
}

func TestRetainHookRoundTrip(t *testing.T) {
	st := mapStore{}
	h := &retainHook{st: st, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	cl := &mochi.Client{ID: "d1"}
	pk := packets.Packet{TopicName: "devices/d1/s/online", Payload: []byte("yes"), Origin: "d1", Created: 1700000000,
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true},
		Properties:  packets.Properties{ContentType: "text/plain"}}
	h.OnRetainMessage(cl, pk, 1)
	st["junk"] = []byte("{not json")
	got, err := h.StoredRetainedMessages()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 {
		t.Fatalf("got %d stored messages, want 1 (the unreadable one skipped)", len(got))
	}
	back := got[0].ToPacket()
	want := []any{"devices/d1/s/online", "yes", byte(1), true, "text/plain"}
	have := []any{back.TopicName, string(back.Payload), back.FixedHeader.Qos, back.FixedHeader.Retain, back.Properties.ContentType}
	if d := cmp.Diff(want, have); d != "" {
		t.Errorf("retained message after the store (-want +got):\n%s", d)
	}
	h.OnRetainMessage(cl, packets.Packet{TopicName: "devices/d1/s/online"}, -1)
	if _, ok := st["devices/d1/s/online"]; ok {
		t.Error("cleared retained message still stored")
	}
}

// countingStore is a mapStore safe for the broker's goroutines that counts
// its writes (each a synced bbolt transaction in the gateway's store).
type countingStore struct {
	mu     sync.Mutex
	m      mapStore
	writes int
}

func newCountingStore() *countingStore { return &countingStore{m: mapStore{}} }

func (c *countingStore) PutRetained(t string, v []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	return c.m.PutRetained(t, v)
}

func (c *countingStore) DeleteRetained(ts ...string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	return c.m.DeleteRetained(ts...)
}

func (c *countingStore) DeleteRetainedUnder(prefix string) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	return c.m.DeleteRetainedUnder(prefix)
}

func (c *countingStore) ForEachRetained(fn func(string, []byte) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m.ForEachRetained(fn)
}

// held returns the stored topics, sorted, and the writes so far.
func (c *countingStore) held() ([]string, int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Sorted(maps.Keys(c.m)), c.writes
}

// TestEmptyRetainedOnNewTopicNotStored: an empty retained publish on a
// topic that holds no retained message changes nothing in the broker, so
// it writes nothing to the store. It was stored as an empty record: a
// synced write per publish, on as many new topics as the device liked,
// never deleted or expired (mochi did not hold it) and not counted
// against MaxRetained. Clearing a topic that holds one deletes it, and a
// message is stored once retained.
func TestEmptyRetainedOnNewTopicNotStored(t *testing.T) {
	st := newCountingStore()
	r := newRigWith(t, queue.Options{}, Config{Retained: st, MaxRetained: 2}, nil)
	d := r.dial(t, "deva", 5)
	var id uint16
	retain := func(topic, payload string) {
		t.Helper()
		id++
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
			TopicName: "devices/deva/s/" + topic, Payload: []byte(payload)})
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Puback || pk.PacketID != id || pk.ReasonCode != 0 {
			t.Fatalf("retain %q on %s: got packet type %d id %d reason %#x, want PUBACK %d 0", payload, topic, pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode, id)
		}
	}
	for i := range 20 {
		retain(fmt.Sprintf("new%d", i), "")
	}
	if topics, writes := st.held(); len(topics) != 0 || writes != 0 {
		t.Errorf("after 20 empty retained publishes on new topics: store holds %v after %d writes, want nothing and none", topics, writes)
	}
	retain("a", "1")
	retain("a", "")
	retain("a", "")
	if topics, writes := st.held(); len(topics) != 0 || writes != 2 {
		t.Errorf("after retaining a, clearing it and clearing it again: store holds %v after %d writes, want nothing after 2", topics, writes)
	}
	retain("b", "2")
	if topics, _ := st.held(); !slices.Equal(topics, []string{"devices/deva/s/b"}) {
		t.Errorf("store holds %v, want devices/deva/s/b", topics)
	}
}

// At start the broker loads no stored record with an empty payload (what
// earlier versions stored for an empty retained publish on a new topic),
// and the store deletes them, in one write; the others load.
func TestStoredEmptyRetainedDeletedAtStart(t *testing.T) {
	st := newCountingStore()
	record := func(topic, payload string) []byte {
		b, err := json.Marshal(storage.Message{ID: topic, T: storage.RetainedKey, TopicName: topic, Payload: []byte(payload),
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	st.m["devices/deva/s/kept"] = record("devices/deva/s/kept", "yes")
	for i := range 3 {
		topic := fmt.Sprintf("devices/deva/s/empty%d", i)
		st.m[topic] = record(topic, "")
	}
	r := newRigWith(t, queue.Options{}, Config{Retained: st}, nil)
	r.dial(t, "devb", 5) // answered once the broker has loaded the store
	if topics, writes := st.held(); !slices.Equal(topics, []string{"devices/deva/s/kept"}) || writes != 1 {
		t.Errorf("after start: store holds %v after %d writes, want devices/deva/s/kept after 1", topics, writes)
	}
	if p, ok := r.s.Retained("devices/deva/s/kept"); !ok || string(p) != "yes" {
		t.Errorf("retained on devices/deva/s/kept after start: %q %v, want yes", p, ok)
	}
	if got := len(r.s.mq.Topics.Messages("devices/#")); got != 1 {
		t.Errorf("broker holds %d retained device messages, want 1", got)
	}
}

// TestDropRetained: DropRetained drops a device's retained messages from
// the broker and the store, so that a new subscriber gets none of them,
// and leaves those of a device whose id starts with the same letters.
func TestDropRetained(t *testing.T) {
	st := newCountingStore()
	r := newRigWith(t, queue.Options{}, Config{Retained: st}, nil)
	for _, dev := range []string{"dev1", "dev10"} {
		d := r.dial(t, dev, 5)
		for i, topic := range []string{"s/online", "t/temp"} {
			id := uint16(i + 1)
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, PacketID: id,
				TopicName: "devices/" + dev + "/" + topic, Payload: []byte("1")})
			if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Puback || pk.ReasonCode != 0 {
				t.Fatalf("%s retains %s: packet type %d reason %#x, want PUBACK 0", dev, topic, pk.FixedHeader.Type, pk.ReasonCode)
			}
		}
	}
	retained := func(filter string) []string {
		var got []string
		cancel, err := r.s.Subscribe(filter, func(topic string, _ []byte) { got = append(got, topic) })
		if err != nil {
			t.Fatal(err)
		}
		cancel()
		slices.Sort(got)
		return got
	}
	if got := retained("devices/dev1/#"); len(got) != 2 {
		t.Fatalf("before the drop a new subscriber to devices/dev1/# gets %v, want 2 retained messages", got)
	}
	n, err := r.s.DropRetained("dev1")
	if err != nil || n != 2 {
		t.Errorf("DropRetained(dev1) = %d, %v; want 2", n, err)
	}
	if got := retained("devices/dev1/#"); len(got) != 0 {
		t.Errorf("after the drop a new subscriber to devices/dev1/# gets %v, want nothing", got)
	}
	want := []string{"devices/dev10/s/online", "devices/dev10/t/temp"}
	if d := cmp.Diff(want, retained("devices/dev10/#")); d != "" {
		t.Errorf("dev10's retained messages in the broker (-want +got):\n%s", d)
	}
	if topics, _ := st.held(); !slices.Equal(topics, want) {
		t.Errorf("store holds %v, want %v", topics, want)
	}
}

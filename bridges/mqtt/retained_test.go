package mqtt

import (
	"io"
	"log/slog"
	"testing"

	"github.com/google/go-cmp/cmp"
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type mapStore map[string][]byte

func (m mapStore) PutRetained(t string, v []byte) error { m[t] = append([]byte(nil), v...); return nil }
func (m mapStore) DeleteRetained(t string) error        { delete(m, t); return nil }
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

package mqtt

import (
	"log/slog"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// A device that publishes outside its namespace in a loop gets a PUBACK
// 0x87 for each and each is counted (publish_outside_namespace), in a log
// line or two (one per device and kind per 10 s); another device's
// refusal meanwhile still gets its own line. Before, each wrote a line.
func TestDeviceRefusalsDoNotFloodTheLog(t *testing.T) {
	lb := &logbuf.Buffer{}
	r := newRigClock(t, queue.Options{}, Config{}, nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
	before := r.refusals(hub.ReasonPublishACL)
	refuse := func(d *device, id uint16) {
		t.Helper()
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id,
			TopicName: "devices/devb/t/x", Payload: []byte("1")})
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Puback || pk.PacketID != id || pk.ReasonCode != packets.ErrNotAuthorized.Code {
			t.Fatalf("answer to a publish outside the namespace: type %d id %d reason %#x, want PUBACK %d 0x87", pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode, id)
		}
	}
	const n = 100
	a := r.dial(t, "deva", 5)
	for i := range n {
		refuse(a, uint16(i+1))
	}
	c := r.dial(t, "devc", 5)
	refuse(c, 1)
	if got := r.refusals(hub.ReasonPublishACL) - before; got != n+1 {
		t.Fatalf("publish_outside_namespace refusals %v, want %d: every refusal is counted", got, n+1)
	}
	const line = "mqtt: publish refused: topic outside the device namespace"
	if got := len(lb.Lines(line, "device=deva")); got < 1 || got > 2 {
		t.Errorf("%d log lines for %d refusals of deva, want 1 or 2 (one per 10 s)", got, n)
	}
	if got := len(lb.Lines(line, "device=devc")); got != 1 {
		t.Errorf("%d log lines for the refusal of devc, want its own line", got)
	}
}

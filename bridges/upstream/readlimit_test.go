package upstream

import (
	"log/slog"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
)

// TestBrokerOversizePacketClosesConnection: the broker sends a PUBLISH
// header claiming a remaining length of 268,435,455 bytes (ff ff ff 7f),
// a thousand times the 256 KiB Maximum Packet Size the link announced.
// The link reads no further: its heap does not grow by the claimed size
// (paho's reader allocated the whole remaining length before reading the
// body, 256 MiB, and the broker could repeat it at every reconnect), it
// closes the connection, counts packet_too_large, says why in one log line,
// and reconnects.
func TestBrokerOversizePacketClosesConnection(t *testing.T) {
	fb := startFakeBroker(t)
	var log logbuf.Buffer
	l := startLinkWith(t, fb.config(t), t.TempDir(), func(u *Upstream) {
		u.log = slog.New(slog.NewTextHandler(&log, nil))
	})
	c := fb.next(t)
	waitFor(t, "connected", 10*time.Second, func() bool { return l.up.Status().Connected })

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c.wmu.Lock()
	_, err := c.conn.Write([]byte{0x30, 0xff, 0xff, 0xff, 0x7f})
	c.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.done: // the link closed the connection
	case <-time.After(10 * time.Second):
	}
	runtime.ReadMemStats(&after)
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 32<<20 {
		t.Errorf("the link allocated %d MiB after the oversize header, want far less than the 256 MiB it claims", grown>>20)
	}
	if !closed(c.done) {
		t.Fatalf("the link did not close the connection within 10s of a packet larger than it announced; status %+v", l.up.Status())
	}
	fb.next(t) // it reconnects
	waitFor(t, "packet_too_large counted", 10*time.Second, func() bool {
		return metricLabel(t, l, "bastion_upstream_downlink_total", readTooLarge) == 1
	})
	const why = "of 268435460 bytes, larger than the Maximum Packet Size of 262144 bytes the link announced"
	if n := strings.Count(log.String(), why); n != 1 {
		t.Errorf("%d log lines say why the connection ended, want 1:\n%s", n, log.String())
	}
}

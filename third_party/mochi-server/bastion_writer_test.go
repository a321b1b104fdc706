package mqtt

import (
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestLazyWriteLoop (Bastion patch): packets queued in bursts, with pauses
// long enough for the writer to find the queue empty and end, all reach the
// connection, and no writer is left running once the client is idle.
func TestLazyWriteLoop(t *testing.T) {
	s := newServer()
	cl, r, _ := newTestClient()
	defer cl.Stop(errClientStop)
	s.Clients.Add(cl)

	pk := *packets.TPacketData[packets.Publish].Get(packets.TPublishBasic).Packet
	raw := len(packets.TPacketData[packets.Publish].Get(packets.TPublishBasic).RawBytes)

	var got atomic.Int64
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			got.Add(int64(n))
			if err != nil {
				if err != io.EOF && err != io.ErrClosedPipe {
					t.Errorf("read: %v", err)
				}
				return
			}
		}
	}()

	want := 0
	for round := 0; round < 300; round++ {
		for k := 0; k <= round%3; k++ {
			if _, err := s.publishToClient(cl, packets.Subscription{Filter: "a/b/c"}, pk); err == nil {
				want++
			}
		}
		if round%5 == 0 {
			time.Sleep(100 * time.Microsecond)
		}
	}
	require.Greater(t, want, 100) // the queue holds 3: some bursts are refused, as they should be
	deadline := time.Now().Add(5 * time.Second)
	for got.Load() < int64(want*raw) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.Equal(t, int64(want*raw), got.Load(), "bytes written for %d queued packets", want)
	for cl.State.writing.Load() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	require.False(t, cl.State.writing.Load(), "a writer is still running on an idle client")
}

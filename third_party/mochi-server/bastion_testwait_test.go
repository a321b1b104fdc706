package mqtt

import (
	"sync/atomic"
	"time"
)

// waitPacketsSent waits, up to 10 s, until cl has written n packets: a
// test that closes a client's pipe right after queueing a write otherwise
// races the writer goroutine.
func waitPacketsSent(cl *Client, n int64) {
	for deadline := time.Now().Add(10 * time.Second); atomic.LoadInt64(&cl.ops.info.PacketsSent) < n && time.Now().Before(deadline); {
		time.Sleep(100 * time.Microsecond)
	}
}

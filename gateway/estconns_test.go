package gateway

import (
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// TestESTConnLimitPerSource: while a window is open, a LAN host that opens
// connections to the EST listener and keeps them (it takes a handshake
// without a client certificate) holds at most estMaxUnclaimedPerAddr;
// each one more is closed at once and counted in
// bastion_https_handshake_refusals_total{server="est",reason="handshake_limit"}.
// Before, the listener had no bound: it kept as many as the host opened.
func TestESTConnLimitPerSource(t *testing.T) {
	g := startESTPairing(t)
	addr := g.openESTWindow(t)
	const more = 5
	for range estMaxUnclaimedPerAddr + more {
		dialFrom(t, "127.0.5.1", addr) // sends nothing
	}
	count := func() float64 {
		return testutil.ToFloat64(g.g.metrics.httpsRefusals.WithLabelValues("est", hub.ReasonHandshakeLimit))
	}
	waitCount(t, fmt.Sprintf("EST handshake_limit refusals for %d connections from one address", estMaxUnclaimedPerAddr+more), count, more)
}

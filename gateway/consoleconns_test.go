package gateway

import (
	"fmt"
	"net"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// TestConsoleConnLimitCounted: the console's listener bounds the
// connections of one address that are not signed in (its own tests are in
// gateway/console), and counts each it closes in
// bastion_https_handshake_refusals_total{server="console",reason="handshake_limit"}.
func TestConsoleConnLimitCounted(t *testing.T) {
	r := start(t, filepath.Join(t.TempDir(), "state"), nil)
	defer r.stop(t)
	addr := r.g.Addrs()["console"]
	const perAddr, more = 8, 3 // console's maxNotSignedInPerAddr
	var conns []net.Conn
	defer func() { // before the gateway stops: it would wait for them
		for _, c := range conns {
			c.Close()
		}
	}()
	for range perAddr + more {
		conns = append(conns, dialFrom(t, "127.0.4.1", addr)) // sends nothing
	}
	count := func() float64 {
		return testutil.ToFloat64(r.g.metrics.httpsRefusals.WithLabelValues("console", hub.ReasonHandshakeLimit))
	}
	waitCount(t, fmt.Sprintf("console handshake_limit refusals for %d connections from one address", perAddr+more), count, more)
}

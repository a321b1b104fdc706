package gateway

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// The listener's bounds themselves, in the order they are looked at, are
// tested in internal/connlimit (TestListener, before TestFirmwareConnLimit
// here).

// TestFirmwareHTTPSConnCapCounted: the firmware HTTPS listener holds at
// most fwMaxConns connections; one more is counted in
// bastion_https_handshake_refusals_total{server="firmware",reason="conn_limit"}.
// The connections held are a device's, authenticated, all from one
// address: each gave its place among the unauthenticated ones back, or
// past fwMaxUnauthPerSource the next would have been refused.
func TestFirmwareHTTPSConnCapCounted(t *testing.T) {
	g := startFirmwareGateway(t, newFWVendor(t))
	dev, _ := g.addFWDevice(t, "thermo", "cert", fwClassA)
	addr := g.g.FirmwareHTTPSAddr().String()
	for range fwMaxConns {
		authConnFrom(t, dev, "127.0.0.1", addr)
	}
	dialFrom(t, "127.0.0.1", addr)
	count := g.g.metrics.httpsRefusals.WithLabelValues("firmware", "conn_limit")
	deadline := time.Now().Add(20 * time.Second)
	for testutil.ToFloat64(count) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open: conn_limit refusals = %v, want 1", fwMaxConns+1, testutil.ToFloat64(count))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := testutil.ToFloat64(count); got != 1 {
		t.Errorf("conn_limit refusals = %v, want 1", got)
	}
	if got := testutil.ToFloat64(g.g.metrics.httpsRefusals.WithLabelValues("firmware", hub.ReasonHandshakeLimit)); got != 0 {
		t.Errorf("handshake_limit refusals = %v, want 0: authenticated connections hold no place among the unauthenticated", got)
	}
}

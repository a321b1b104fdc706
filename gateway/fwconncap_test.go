package gateway

import (
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// TestFirmwareConnCap: past its cap the listener closes a new connection
// at once and says so; a connection closed (twice, as net/http and
// crypto/tls may) gives back one slot.
func TestFirmwareConnCap(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := make(chan struct{}, 8)
	l := &connCap{Listener: ln, slots: make(chan struct{}, 2), refused: func() { refused <- struct{}{} }}
	accepted := make(chan net.Conn)
	go func() {
		defer close(accepted)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() {
		l.Close()
		for c := range accepted {
			c.Close()
		}
	})
	dial := func() net.Conn {
		t.Helper()
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	accept := func(what string) net.Conn {
		t.Helper()
		dial()
		select {
		case c := <-accepted:
			return c
		case <-refused:
			t.Fatalf("%s: refused, want it accepted", what)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: not accepted within 10s", what)
		}
		return nil
	}
	refuse := func(what string) {
		t.Helper()
		c := dial()
		select {
		case <-refused:
		case s := <-accepted:
			s.Close()
			t.Fatalf("%s: accepted, want it refused", what)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: neither accepted nor refused within 10s", what)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Errorf("%s: read %d bytes, %v; want the connection closed", what, n, err)
		}
	}
	first := accept("first connection")
	accept("second connection")
	refuse("third connection")
	first.Close()
	first.Close()
	accept("a connection after one closed")
	refuse("one more")
}

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

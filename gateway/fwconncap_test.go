package gateway

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

// TestFirmwareConnLimit: the listener's bounds, in the order they are
// looked at, with 3 places, 1 connection not authenticated per address
// and 2 in all. Each line of want is what one new connection causes.
func TestFirmwareConnLimit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan string, 16)
	host := func(c net.Conn) string { return c.RemoteAddr().(*net.TCPAddr).IP.String() }
	l := &connLimit{Listener: ln, slots: make(chan struct{}, 3), unauth: bridges.NewSourceLimit[net.Conn](1, 32, 2),
		limited: func(c net.Conn, _ bridges.Source, by bridges.Bound) {
			events <- "limited by " + by.String() + ": " + host(c)
		},
		pushedOut: func(c net.Conn) { events <- "pushed out: " + host(c) },
		refused:   func(c net.Conn) { events <- "refused: " + host(c) },
	}
	accepted := make(chan *limitedConn, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			events <- "accepted: " + host(c)
			accepted <- c.(*limitedConn)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	servers := map[string]*limitedConn{}
	t.Cleanup(func() {
		for _, c := range servers {
			c.Close()
		}
	})
	// dial connects from the loopback address from, checks what the
	// listener does, in order, and returns the client's end.
	dial := func(from string, want ...string) net.Conn {
		t.Helper()
		c := dialFrom(t, from, ln.Addr().String())
		var got []string
		for range want {
			select {
			case e := <-events:
				got = append(got, e)
			case <-time.After(10 * time.Second):
				t.Fatalf("connection from %s: %q within 10s, want %q", from, got, want)
			}
			if strings.HasPrefix(got[len(got)-1], "accepted: ") {
				servers[from] = <-accepted
			}
			if got[len(got)-1] != want[len(got)-1] {
				break
			}
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("connection from %s (-want +got):\n%s", from, diff)
		}
		return c
	}
	closed := func(c net.Conn) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Errorf("connection from %s: read %d bytes, %v; want it closed", c.LocalAddr(), n, err)
		}
	}

	dial("127.0.0.1", "accepted: 127.0.0.1")
	servers["127.0.0.1"].claim()
	c2 := dial("127.0.0.2", "accepted: 127.0.0.2")
	dial("127.0.0.3", "accepted: 127.0.0.3")
	// All 3 places taken, 2 not authenticated: the oldest of those is
	// closed for the total's bound, which gives its place back.
	c4 := dial("127.0.0.4", "limited by total: 127.0.0.2", "accepted: 127.0.0.4")
	closed(c2)
	// 127.0.0.4 holds its address's bound: refused, though 127.0.0.3
	// could be pushed out.
	closed(dial("127.0.0.4", "limited by source: 127.0.0.4"))
	// Under the total but no place left: the oldest not authenticated is
	// pushed out, not 127.0.0.1, authenticated before it.
	servers["127.0.0.3"].claim()
	dial("127.0.0.5", "pushed out: 127.0.0.4", "accepted: 127.0.0.5")
	closed(c4)
	if _, err := servers["127.0.0.4"].Read(make([]byte, 1)); err != errEvicted {
		t.Errorf("pushed-out connection's read: %v, want errEvicted (counted once, not again as a failed handshake)", err)
	}
	// Every open connection authenticated: the new one is refused.
	servers["127.0.0.5"].claim()
	closed(dial("127.0.0.6", "refused: 127.0.0.6"))
	// Closed twice (as net/http and crypto/tls may), a connection gives
	// one place back.
	servers["127.0.0.3"].Close()
	servers["127.0.0.3"].Close()
	dial("127.0.0.7", "accepted: 127.0.0.7")
	servers["127.0.0.7"].claim()
	dial("127.0.0.8", "refused: 127.0.0.8")
	// The only one not authenticated is pushed out, however new.
	servers["127.0.0.1"].Close()
	c9 := dial("127.0.0.9", "accepted: 127.0.0.9")
	dial("127.0.0.10", "pushed out: 127.0.0.9", "accepted: 127.0.0.10")
	closed(c9)
	// Claimed once pushed out, it stays out: the pushing out counted it.
	servers["127.0.0.9"].claim()
	if got := servers["127.0.0.9"].state.Load(); got != connPushedOut {
		t.Errorf("pushed-out connection claimed: state %d, want connPushedOut", got)
	}
	if got := l.unauth.Len(); got != 1 {
		t.Errorf("not authenticated = %d, want 1 (127.0.0.10)", got)
	}
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

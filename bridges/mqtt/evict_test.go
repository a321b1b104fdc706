package mqtt

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// waitingLen reports how many connections the listener holds as not yet
// authenticated.
func (r *rig) waitingLen() int {
	r.s.tls.mu.Lock()
	defer r.s.tls.mu.Unlock()
	return r.s.tls.waiting.Len()
}

// rawTCP opens a TCP connection to the server that sends nothing.
func (r *rig) rawTCP(t *testing.T) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", r.s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByServer fails unless the server has closed c (within 3 s).
func closedByServer(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("%s: not closed by the server: %v", what, err)
	}
}

// TestEvictedHandshakeCountedOnce: a connection in its TLS handshake that
// the total's bound closes to make room for a newer one is counted once,
// as handshake_limit, not also as a failed handshake, and logged as
// closed, not as "TLS handshake failed ... use of closed network
// connection". Before, its goroutine saw the handshake fail on the closed
// connection and counted and logged it again.
func TestEvictedHandshakeCountedOnce(t *testing.T) {
	const total = 3
	lb := &logbuf.Buffer{}
	r := newRigClock(t, queue.Options{}, Config{MaxUnauth: total}, nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
	var idle, later []net.Conn
	for range total {
		idle = append(idle, r.rawTCP(t))
	}
	waitFor(t, "the idle connections to be admitted", func() bool { return r.waitingLen() == total })
	for range total {
		later = append(later, r.rawTCP(t)) // each closes the oldest idle one
	}
	for i, c := range idle {
		closedByServer(t, c, fmt.Sprintf("idle connection %d", i))
	}
	// The later ones authenticate, so that none is still in its handshake
	// when the server stops (which ends such a one as a failed handshake).
	for i, c := range later {
		id := fmt.Sprintf("dev-%d", i)
		cert, _ := r.issue(t, id)
		tc := tls.Client(c, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1",
			Certificates: []tls.Certificate{cert}})
		d := &device{t: t, id: id, ver: 5, c: tc, r: bufio.NewReader(tc)}
		d.connect()
		if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
			t.Fatalf("%s: got packet type %d reason %#x, want CONNACK 0", id, pk.FixedHeader.Type, pk.ReasonCode)
		}
	}
	if err := r.stop(); err != nil { // every connection's goroutine has ended
		t.Fatal(err)
	}
	hs := func(result string) float64 {
		return testutil.ToFloat64(r.hub.Metrics().Handshakes.WithLabelValues(hub.MQTT, result))
	}
	if got := r.refusals(hub.ReasonHandshakeLimit); got != total {
		t.Errorf("handshake_limit refusals %v, want %d", got, total)
	}
	if got := hs("failed"); got != 0 {
		t.Errorf("failed handshakes %v, want 0 (the closed ones are handshake_limit)", got)
	}
	if got := hs("ok"); got != total {
		t.Errorf("handshakes ok %v, want %d", got, total)
	}
	if l := lb.Lines("TLS handshake failed"); len(l) != 0 {
		t.Errorf("closed connections logged as failed handshakes: %q", l)
	}
	if l := lb.Lines("oldest unauthenticated connection closed"); len(l) != 1 {
		t.Errorf("eviction lines %q, want 1 (once a minute)", l)
	}
}

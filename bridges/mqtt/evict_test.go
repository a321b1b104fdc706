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

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// waitingLen reports how many connections the listener holds as not yet
// authenticated.
func (r *rig) waitingLen() int {
	return r.s.tls.limit.Len()
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
	// The later ones authenticate: their handshakes are counted ok.
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

// TestHandshakesEndedByShutdownNotFailed: connections still in their TLS
// handshake when the server stops, one that sent nothing and one stalled
// in the middle of it (its client certificate not sent yet), are ended by
// the shutdown, which is no failure: not counted as failed handshakes nor
// logged as such. Before, each was counted
// bastion_transport_handshakes_total{result="failed"} and logged "TLS
// handshake failed ... context canceled".
func TestHandshakesEndedByShutdownNotFailed(t *testing.T) {
	lb := &logbuf.Buffer{}
	r := newRigClock(t, queue.Options{}, Config{}, nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
	r.rawTCP(t)
	cert, _ := r.issue(t, "dev-stalled")
	reached, release := make(chan struct{}), make(chan struct{})
	tc := tls.Client(r.rawTCP(t), &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1",
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			close(reached)
			<-release
			return &cert, nil
		}})
	handshook := make(chan error, 1)
	go func() { handshook <- tc.Handshake() }()
	t.Cleanup(func() {
		close(release)
		<-handshook
	})
	select {
	case <-reached:
	case <-time.After(10 * time.Second):
		t.Fatal("the stalled client never got the server's certificate request")
	}
	waitFor(t, "both connections to be admitted", func() bool { return r.waitingLen() == 2 })
	if err := r.stop(); err != nil { // every connection's goroutine has ended
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(r.hub.Metrics().Handshakes.WithLabelValues(hub.MQTT, "failed")); got != 0 {
		t.Errorf("failed handshakes %v after a shutdown ended two in progress, want 0", got)
	}
	if l := lb.Lines("TLS handshake failed"); len(l) != 0 {
		t.Errorf("handshakes ended by the shutdown logged as failed: %q", l)
	}
}

// TestAcceptedConnectionNotEvicted: a connection whose CONNECT was
// accepted, held in accept (where the device's older sessions are ended,
// each for up to endWait) before its CONNACK, is no longer one the
// limits close to make room: it gets its CONNACK and stays open while
// newer idle connections fill the total. Before, it held its slot until
// after accept and was closed (the oldest), its older session already
// ended: the device had none.
func TestAcceptedConnectionNotEvicted(t *testing.T) {
	const total = 2
	r := newRigWith(t, queue.Options{}, Config{MaxUnauth: total}, nil)
	entered, release := holdFirstAccept(r)

	d := r.dialTLS(t, "d1", 5, true)
	d.connect()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the CONNECT was not accepted")
	}
	for range total {
		r.rawTCP(t)
	}
	waitFor(t, "the idle connections to be admitted", func() bool { return r.waitingLen() == total })
	close(release)
	pk, err := d.readErr(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("accepted CONNECT: got packet type %d reason %#x, err %v; want CONNACK 0", pk.FixedHeader.Type, pk.ReasonCode, err)
	}
	if !d.open() {
		t.Fatal("the accepted session was closed")
	}
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 0 {
		t.Errorf("handshake_limit refusals %v, want 0", got)
	}
}

// TestEvictedDuringCheckNotAccepted: a CONNECT whose connection the
// limits closed during its credential check (a secret's argon2id) is not
// accepted when the check ends: it does not end the device's session
// (no session_taken_over), is not logged as connected, and is counted
// once, as handshake_limit. Before, accept ran for it anyway: the
// device's open session was ended for a connection already closed.
func TestEvictedDuringCheckNotAccepted(t *testing.T) {
	lb := &logbuf.Buffer{}
	id := &slowIdentity{stallAt: 2, stalled: make(chan chan struct{}), revoked: map[string]bool{}}
	r := newRigClock(t, queue.Options{}, Config{AllowSecretAuth: true, MaxUnauth: 1}, func(ca *pki.CA) bridges.Identity {
		id.caIdentity = caIdentity{ca}
		return id
	}, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
	login := func() *device {
		d := r.dialTLS(t, "d1", 5, false)
		d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "d1",
				Username: []byte("d1"), UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true}})
		return d
	}
	b1 := login() // the first check: the device's session
	if pk := b1.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("first login: got packet type %d reason %#x, want CONNACK 0", pk.FixedHeader.Type, pk.ReasonCode)
	}
	b2 := login() // the second check, stalled
	var releaseCheck chan struct{}
	select {
	case releaseCheck = <-id.stalled:
	case <-time.After(10 * time.Second):
		t.Fatal("the second CONNECT's secret check never ran")
	}
	r.rawTCP(t) // closes b2, the oldest unauthenticated connection
	closedByServer(t, b2.c, "the connection in its check")
	close(releaseCheck)
	waitFor(t, "the closed connection's session to end", func() bool { return r.s.connsOf("d1") <= 1 })
	if !b1.open() {
		t.Fatal("the device's session was ended by a CONNECT whose connection was closed during its check")
	}
	if got := r.refusals(hub.ReasonSessionTakenOver); got != 0 {
		t.Errorf("session_taken_over refusals %v, want 0", got)
	}
	if got := r.refusals(hub.ReasonHandshakeLimit); got != 1 {
		t.Errorf("handshake_limit refusals %v, want 1", got)
	}
	if l := lb.Lines("mqtt: device connected", "device=d1"); len(l) != 1 {
		t.Errorf("device connected lines %q, want 1 (the first login)", l)
	}
}

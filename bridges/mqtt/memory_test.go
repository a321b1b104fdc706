package mqtt

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
)

type acceptSink struct{}

func (acceptSink) Accept(context.Context, bridges.Message) error { return nil }

// liveBytes returns the live heap and the goroutine stacks after two GCs.
func liveBytes() (heap, stacks uint64) {
	runtime.GC()
	runtime.GC()
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64(), s[1].Value.Uint64()
}

// TestIdleSessionMemory connects real devices (TLS 1.3, client
// certificates from the gateway CA, MQTT 3.1.1 CONNECT) and checks what each
// idle session costs: one goroutine (mochi's reader; its writer runs only
// while packets are queued), at most 48 KiB of live heap and, without the
// race detector (which enlarges every frame), at most 12 KiB of goroutine
// stacks. A session measures ≈ 21 KiB of heap here (server ≈ 13 KiB, of
// which crypto/tls ≈ 9.5 KiB; the rest is this test's client tls.Conn) and
// ≈ 8 KiB of stacks (≈ 16 KiB with -race), so only a real regression trips
// it: mochi's default outbound queue (8192 slots) alone adds 64 KiB of heap;
// losing either third_party/mochi-server patch brings back a second
// goroutine or a reader stack of 16 KiB (unpatched: 2 goroutines, 20.6 KiB).
func TestIdleSessionMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("connects 200 TLS sessions")
	}
	const sessions = 200
	const maxHeap, maxStacks = 48 << 10, 12 << 10
	srv, ca := sinkServer(t, acceptSink{})

	// Credentials first, so that only sessions are measured.
	roots := x509.NewCertPool()
	roots.AddCert(ca.Root())
	cfgs := make([]*tls.Config, sessions)
	ids := make([]string, sessions)
	for i := range cfgs {
		ids[i] = fmt.Sprintf("mem-%d", i)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			t.Fatal(err)
		}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := ca.IssueDevice(csr, ids[i], time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		cfgs[i] = &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}}
	}
	// One session before measuring, so that one-time allocations (the
	// stack pools, mochi's client map) are not counted per session.
	warm := dialDevice(t, srv.Addr(), cfgs[0], ids[0])
	defer warm.Close()
	waitSessions(t, srv, 1)

	g0 := runtime.NumGoroutine()
	h0, s0 := liveBytes()
	conns := make([]*tls.Conn, 0, sessions-1)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 1; i < sessions; i++ {
		conns = append(conns, dialDevice(t, srv.Addr(), cfgs[i], ids[i]))
	}
	waitSessions(t, srv, sessions)
	n := uint64(len(conns))
	// The handshake's helper goroutines end just after it; wait for them
	// (bounded) rather than count them.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine()-g0 > len(conns) && time.Now().Before(deadline) {
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
	if g := runtime.NumGoroutine() - g0; g > len(conns) {
		t.Errorf("%d goroutines for %d idle sessions; want at most 1 each (mochi's reader)", g, len(conns))
	}
	h1, s1 := liveBytes()
	heap, stacks := (int64(h1)-int64(h0))/int64(n), (int64(s1)-int64(s0))/int64(n)
	t.Logf("per idle session (server + this test's client tls.Conn): heap %.1f KiB, stacks %.1f KiB", float64(heap)/1024, float64(stacks)/1024)
	if heap > maxHeap {
		t.Errorf("idle session holds %d bytes of heap; want at most %d", heap, maxHeap)
	}
	if !raceEnabled && stacks > maxStacks {
		t.Errorf("idle session holds %d bytes of goroutine stacks; want at most %d", stacks, maxStacks)
	}
}

// dialDevice connects as device id and waits for the CONNACK.
func dialDevice(t *testing.T, addr string, cfg *tls.Config, id string) *tls.Conn {
	t.Helper()
	d := &tls.Dialer{Config: cfg, NetDialer: nil}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s as %s: %v", addr, id, err)
	}
	c := nc.(*tls.Conn)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatalf("CONNECT as %s: %v", id, err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		t.Fatalf("CONNACK for %s: %v", id, err)
	}
	if want := []byte{0x20, 0x02, 0x00, 0x00}; !bytes.Equal(ack, want) {
		t.Fatalf("CONNACK for %s: got % x, want % x", id, ack, want)
	}
	c.SetDeadline(time.Time{})
	return c
}

// waitSessions waits (bounded) until the broker counts n sessions: the
// CONNACK is written just before the session hook runs.
func waitSessions(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.SessionCount() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions after 10 s; want %d", s.SessionCount(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

package coap_test

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"log/slog"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// record is a DTLS 1.2 record of type typ, epoch epoch and sequence
// number seq holding body.
func record(typ byte, epoch uint16, seq uint64, body []byte) []byte {
	b := []byte{typ, 0xfe, 0xfd}
	b = binary.BigEndian.AppendUint16(b, epoch)
	b = binary.BigEndian.AppendUint16(b, uint16(seq>>32))
	b = binary.BigEndian.AppendUint32(b, uint32(seq))
	b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
	return append(b, body...)
}

// futureFragments is a handshake record of epoch 0 holding n fragments of
// one byte, each of its own 2-byte ClientKeyExchange from message
// sequence number 100 on: messages that never come, each fragment held
// by the server's fragment buffer at 129 bytes (one byte, 128 for its
// bookkeeping), so that 600 go past its 64 KiB.
func futureFragments(n int) []byte {
	var body []byte
	for i := range n {
		body = append(body, 16, 0, 0, 2) // ClientKeyExchange, length 2
		body = binary.BigEndian.AppendUint16(body, uint16(100+i))
		body = append(body, 0, 0, 0, 0, 0, 1, 'x') // offset 0, one byte
	}
	return record(22, 0, 50, body)
}

// pionDrops is how many refusals s counted under reason.
func pionDrops(s *coap.Server, reason string) float64 {
	return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, reason))
}

// waitDrops waits up to 10 s for at least want refusals under reason.
func waitDrops(t *testing.T, s *coap.Server, reason string, want float64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); pionDrops(s, reason) < want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("refusals{reason=%q} = %v, want at least %v", reason, pionDrops(s, reason), want)
		}
	}
}

// checkDropLine wants one line starting with msg that names the peer's
// address and a size.
func checkDropLine(t *testing.T, lines *coap.LogLines, msg string, from net.Addr, size int) {
	t.Helper()
	attrs := lines.Attrs(msg)
	if len(attrs) != 1 {
		t.Fatalf("%d lines %q, want 1 (at most one per 10 s)", len(attrs), msg)
	}
	if got := attrs[0]["remote"]; got != from.String() {
		t.Errorf("line %q: remote=%q, want the peer's %q", msg, got, from)
	}
	if got := attrs[0]["size"]; got != strconv.Itoa(size) {
		t.Errorf("line %q: size=%q, want %d", msg, got, size)
	}
}

// A peer in a handshake (past the cookie echo) that sends fragments of
// handshake messages that never come fills its connection's fragment
// buffer, which holds 64 KiB (pion-dtls (55)); the record past it is
// dropped, counted (refusals{reason="dtls_fragments_full"}) and logged
// with the peer's address and the record's size. Before, pion told no one
// (bridges/coap set no OnFragmentDropped). The client stalls after its
// cookie echo (its PSK callback waits), so the server is reading its
// records, and its socket sends one record of 600 such fragments.
func TestFragmentFloodCountedAndLogged(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{}, slog.New(lines), 0)
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pc, err := net.ListenPacket("udp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	c := dtlsClient(t, cancel, pc, raddr, stalling(ctx, cfg))
	go c.HandshakeContext(ctx)
	for deadline := time.Now().Add(10 * time.Second); coap.HandshakesInFlight(s) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the stalled handshake was never counted in flight")
		}
	}
	flood := futureFragments(600)
	if _, err := pc.WriteTo(flood, raddr); err != nil {
		t.Fatal(err)
	}
	waitDrops(t, s, "dtls_fragments_full", 1)
	checkDropLine(t, lines, "coap: DTLS handshake record dropped", pc.LocalAddr(), len(flood))
}

// A datagram for a DTLS connection whose queue of datagrams waiting for
// its reader is full (128 datagrams or 64 KiB: pion-dtls (56)) is dropped,
// counted (refusals{reason="dtls_read_queue_full"}) and logged with the
// peer's address and the datagram's size. Before, pion told no one
// (bridges/coap set no OnReadDropped). The server's handshake, which reads
// its connection's datagrams, waits in the identity store's PSK lookup
// while the client's socket sends 12 datagrams of 8,000 bytes: 8 fit in
// 64 KiB, the other 4 are dropped.
func TestReadQueueFloodCountedAndLogged(t *testing.T) {
	inLookup, release := make(chan struct{}), make(chan struct{})
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{},
		after: func(kind string, n int) {
			if kind == "psk" && n == 1 {
				close(inLookup)
				<-release
			}
		}}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{}, slog.New(lines), 0)
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()
	dev := &devicesim.Device{Creds: devicesim.Creds{ID: "dev-psk", Auth: "psk", PSKIdentity: "id-psk", PSK: hex.EncodeToString(id.key)}}
	cfg, err := dev.DTLSConfig(pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pc, err := net.ListenPacket("udp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	c := dtlsClient(t, cancel, pc, raddr, cfg)
	hs := make(chan error, 1)
	go func() { hs <- c.HandshakeContext(ctx) }()
	select {
	case <-inLookup:
	case <-ctx.Done():
		t.Fatal("the server never looked the PSK identity up")
	}
	// Application data of epoch 1 that no key opens: routed to the
	// connection by its address, queued for its reader, then discarded.
	junk := record(23, 1, 1, make([]byte, 8000-13))
	for range 12 {
		if _, err := pc.WriteTo(junk, raddr); err != nil {
			t.Fatal(err)
		}
	}
	waitDrops(t, s, "dtls_read_queue_full", 4)
	checkDropLine(t, lines, "coap: datagram dropped", pc.LocalAddr(), len(junk))
	close(release)
	released = true
	if err := <-hs; err != nil {
		t.Errorf("handshake after the flood: %v", err)
	}
}

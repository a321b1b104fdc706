package mqtt

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/pki"
)

// The hot path of a device message: the gateway without upstream
// (hub.LocalSink, as bastiond --dev and bridges/bench run it), one device on
// a real TLS 1.3 connection with a client certificate, speaking MQTT 5 from
// pre-encoded bytes so that the client allocates nothing per message and
// what is counted is the server's work.

// localServer starts the MQTT server over a hub with hub.LocalSink.
func localServer(tb testing.TB) (*Server, *pki.CA) {
	tb.Helper()
	return sinkServer(tb, hub.LocalSink{})
}

// sinkServer starts the MQTT server on loopback over a hub with sink, with
// a new CA; it stops when the test ends.
func sinkServer(tb testing.TB, sink bridges.Sink) (*Server, *pki.CA) {
	tb.Helper()
	log := slog.New(slog.DiscardHandler)
	ca, err := pki.Open(filepath.Join(tb.TempDir(), "pki"), "gw1", pki.SystemClock{}, log)
	if err != nil {
		tb.Fatal(err)
	}
	sc, err := ca.ServerCert("mqtt", []string{"127.0.0.1"}, 24*time.Hour, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	h, err := hub.New(sink, prometheus.NewRegistry(), log)
	if err != nil {
		tb.Fatal(err)
	}
	s, err := New(Config{Listen: "127.0.0.1:0"}, sc, caIdentity{ca}, h, log)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.Run(ctx) }()
	tb.Cleanup(func() { cancel(); wg.Wait() })
	return s, ca
}

// rawPublisher is an MQTT 5 device that publishes one pre-encoded 100-byte
// message and reads the PUBACKs into a fixed buffer.
type rawPublisher struct {
	c     *tls.Conn
	r     *bufio.Reader
	qos1  []byte // PUBLISH QoS 1; packet id at idOff
	qos0  []byte
	idOff int
	body  [64]byte
}

func dialPublisher(tb testing.TB, s *Server, ca *pki.CA, id string) *rawPublisher {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := ca.IssueDevice(csr, id, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := tls.Dial("tcp", s.Addr(), &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: ca.RootPool(), ServerName: "127.0.0.1",
		Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, ca.Issuer().Raw}, PrivateKey: key}}})
	if err != nil {
		tb.Fatalf("TLS to the MQTT server: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	p := &rawPublisher{c: c, r: bufio.NewReader(c)}
	enc := func(pk packets.Packet) []byte {
		var buf bytes.Buffer
		pk.ProtocolVersion = 5
		var err error
		if pk.FixedHeader.Type == packets.Connect {
			err = pk.ConnectEncode(&buf)
		} else {
			err = pk.PublishEncode(&buf)
		}
		if err != nil {
			tb.Fatal(err)
		}
		return buf.Bytes()
	}
	topic := "devices/" + id + "/t/bench"
	payload := make([]byte, 100)
	p.qos1 = enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 0xabcd, TopicName: topic, Payload: payload})
	p.qos0 = enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: payload})
	lenBytes := 1
	for p.qos1[lenBytes]&0x80 != 0 {
		lenBytes++
	}
	p.idOff = 1 + lenBytes + 2 + len(topic) // fixed header, topic
	if got := binary.BigEndian.Uint16(p.qos1[p.idOff:]); got != 0xabcd {
		tb.Fatalf("packet id not at offset %d of % x", p.idOff, p.qos1)
	}
	connect := enc(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}})
	if _, err := c.Write(connect); err != nil {
		tb.Fatal(err)
	}
	if typ, _, err := p.readPacket(); err != nil || typ != packets.Connack {
		tb.Fatalf("CONNACK: type %d, %v", typ, err)
	}
	return p
}

// readPacket reads one packet into p.body and returns its type and body.
func (p *rawPublisher) readPacket() (byte, []byte, error) {
	b, err := p.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, _, err := packets.DecodeLength(p.r)
	if err != nil {
		return 0, nil, err
	}
	if n > len(p.body) {
		return 0, nil, fmt.Errorf("packet type %d of %d bytes", b>>4, n)
	}
	if _, err := io.ReadFull(p.r, p.body[:n]); err != nil {
		return 0, nil, err
	}
	return b >> 4, p.body[:n], nil
}

// publish1 sends a QoS 1 message with packet id and waits for its PUBACK.
func (p *rawPublisher) publish1(id uint16) error {
	binary.BigEndian.PutUint16(p.qos1[p.idOff:], id)
	if _, err := p.c.Write(p.qos1); err != nil {
		return err
	}
	typ, body, err := p.readPacket()
	switch {
	case err != nil:
		return err
	case typ != packets.Puback || len(body) < 2 || binary.BigEndian.Uint16(body) != id:
		return fmt.Errorf("want PUBACK %d, got type %d % x", id, typ, body)
	case len(body) > 2 && body[2] != 0:
		return fmt.Errorf("PUBACK %d reason 0x%02x", id, body[2])
	}
	return nil
}

func (p *rawPublisher) publish0() error {
	_, err := p.c.Write(p.qos0)
	return err
}

// BenchmarkPublish measures one device's messages through the whole
// server (TLS, mochi, hooks, hub): `go test -run '^$' -bench Publish
// -benchmem -cpuprofile cpu.out ./bridges/mqtt/`. The client is in the same
// process, so ns/op is the round trip, not the server's CPU; allocs/op is
// the server's (the client allocates nothing per message).
func BenchmarkPublish(b *testing.B) {
	s, ca := localServer(b)
	p := dialPublisher(b, s, ca, "bench-1")
	b.Run("qos1", func(b *testing.B) {
		b.ReportAllocs()
		for i := range b.N {
			if err := p.publish1(uint16(i%65535) + 1); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("qos0", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			if err := p.publish0(); err != nil {
				b.Fatal(err)
			}
		}
		// QoS 1 fence: the server handles a connection's packets in order.
		if err := p.publish1(1); err != nil {
			b.Fatal(err)
		}
	})
}

// TestAllocsPerMessage bounds what the server allocates per device message
// (mochi, our hooks, the hub, crypto/tls). Before the third_party/mochi-server
// patches (3)-(6) a QoS 1 message cost 12 allocations (1.5 KiB: the PUBACK
// set into Inflight and deleted again, four empty subscriber maps, a second
// copy of the packet) and a QoS 0 message 8; now 6 and 3 (a QoS 0
// message: mochi's packet and its buffer, and the delivery to subscribers).
func TestAllocsPerMessage(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes what allocates (sync.Pool drops items on purpose)")
	}
	s, ca := localServer(t)
	p := dialPublisher(t, s, ca, "allocs-1")
	const n = 2000
	mallocs := func(f func() error) float64 {
		t.Helper()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if err := f(); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&after)
		return float64(after.Mallocs-before.Mallocs) / n
	}
	warm := func() error { // first messages grow buffers and pools
		for i := range 200 {
			if err := p.publish1(uint16(i + 1)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := warm(); err != nil {
		t.Fatal(err)
	}
	qos1 := mallocs(func() error {
		for i := range n {
			if err := p.publish1(uint16(i + 1)); err != nil {
				return err
			}
		}
		return nil
	})
	// The QoS 0 messages are written in one burst (TLS records of about
	// a hundred packets each): crypto/tls allocates once per read of the
	// connection, and how many reads n separately written packets take
	// depends on how far the server keeps up with the client on this
	// machine (3.5-3.7 allocations per message on one, under 3.5 on
	// another); what is bounded here is the server's cost per message.
	burst := bytes.Repeat(p.qos0, n)
	qos0 := mallocs(func() error {
		if _, err := p.c.Write(burst); err != nil {
			return err
		}
		return p.publish1(1) // the fence: all n were handled before its PUBACK
	})
	t.Logf("allocations per message: QoS 1 %.2f, QoS 0 %.2f", qos1, qos0)
	if qos1 > 6.5 {
		t.Errorf("QoS 1 message: %.2f allocations; want at most 6", qos1)
	}
	if qos0 > 3.25 {
		t.Errorf("QoS 0 message: %.2f allocations; want at most 3", qos0)
	}
}

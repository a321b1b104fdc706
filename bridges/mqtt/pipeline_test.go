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
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/pki"
)

// These tests run the real MQTT server (mochi behind our TLS listener) over
// a real durable queue on disk, with a device speaking raw MQTT over a real
// TLS connection with a client certificate, so that every byte the device
// receives is seen.

// caIdentity is the gateway's certificate check without its store.
type caIdentity struct{ ca *pki.CA }

func (i caIdentity) VerifyCert(raw [][]byte) (string, error) {
	id, _, err := i.ca.VerifyDevice(raw)
	return id, err
}
func (caIdentity) PSK([]byte) (string, []byte, error) {
	return "", nil, errors.New("no PSK devices here")
}
func (caIdentity) CheckSecret(string, []byte) error { return errors.New("no secrets here") }
func (caIdentity) OnRevoke(func(string))            {}
func (i caIdentity) CertValid(device, serial string, notAfter time.Time) error {
	return i.ca.CertValid(device, serial, notAfter)
}

type rig struct {
	s   *Server
	hub *hub.Hub
	q   *queue.Queue
	reg *prometheus.Registry
	ca  *pki.CA
	// from, if set, is the local address devices dial from (another
	// source address than 127.0.0.1).
	from string
	// rcvBuf, if set, is the devices' socket receive buffer (SO_RCVBUF,
	// set before connecting so that the window stays that small).
	rcvBuf int
	// stop ends the server (as the test's cleanup does) and returns Run's
	// error; later calls return the same.
	stop func() error
}

func (r *rig) tlsDial(cfg *tls.Config) (*tls.Conn, error) {
	d := &net.Dialer{Timeout: 10 * time.Second}
	if r.from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(r.from)}
	}
	if r.rcvBuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, r.rcvBuf)
			})
			return errors.Join(err, serr)
		}
	}
	return tls.DialWithDialer(d, "tcp", r.addrFrom(r.from), cfg)
}

// addrFrom is the address to dial the server at from the local address
// from ("": any): its bound address, or for a server bound to all
// addresses ([::]:port, in a test's network namespace) the loopback
// address of from's family.
func (r *rig) addrFrom(from string) string {
	addr := r.s.Addr()
	host, port, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsUnspecified() {
		return addr
	}
	if ip := net.ParseIP(from); ip != nil && ip.To4() != nil {
		return net.JoinHostPort("127.0.0.1", port)
	}
	return net.JoinHostPort("::1", port)
}

// heldSync is a queue Sync that blocks every fsync while held, and can be
// told to fail them.
type heldSync struct {
	mu       sync.Mutex
	gate     chan struct{} // closed when fsyncs may proceed
	fail     error
	entered  chan struct{} // one token per fsync started
	released bool
}

func newHeldSync() *heldSync {
	return &heldSync{gate: make(chan struct{}), entered: make(chan struct{}, 1024)}
}

func (h *heldSync) sync(f *os.File) error {
	select {
	case h.entered <- struct{}{}:
	default:
	}
	h.mu.Lock()
	gate := h.gate
	h.mu.Unlock()
	<-gate
	h.mu.Lock()
	err := h.fail
	h.mu.Unlock()
	if err != nil {
		return err
	}
	return f.Sync()
}

// release lets the held fsyncs go on, failing them with fail; only the
// first call counts.
func (h *heldSync) release(fail error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return
	}
	h.released = true
	h.fail = fail
	close(h.gate)
}

func newRig(t *testing.T, opts queue.Options) *rig {
	t.Helper()
	return newRigWith(t, opts, Config{}, nil)
}

// newRigWith is newRig with a configuration (Listen, if unset, is
// 127.0.0.1:0) and, if id is not nil, the identity it makes from the rig's
// CA.
func newRigWith(t *testing.T, opts queue.Options, cfg Config, id func(*pki.CA) bridges.Identity) *rig {
	t.Helper()
	return newRigClock(t, opts, cfg, id, pki.SystemClock{}, nil)
}

// newRigClock is newRigWith with the CA on clock and the server logging
// to log (nil: discarded).
func newRigClock(t *testing.T, opts queue.Options, cfg Config, id func(*pki.CA) bridges.Identity, clock pki.Clock, log *slog.Logger) *rig {
	t.Helper()
	dir := t.TempDir()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ca, err := pki.Open(filepath.Join(dir, "ca"), "gw1", clock, log)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ca.ServerCert("mqtt", []string{"127.0.0.1"}, 24*time.Hour, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	q, err := queue.Open(filepath.Join(dir, "queue"), opts, log, reg)
	if err != nil {
		t.Fatal(err)
	}
	h, err := hub.New(q, reg, log)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	var ident bridges.Identity = caIdentity{ca}
	if id != nil {
		ident = id(ca)
	}
	s, err := New(cfg, sc, ident, h, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	stop := sync.OnceValue(func() error {
		cancel()
		return <-done
	})
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("mqtt server: %v", err)
		}
		q.Close()
	})
	return &rig{s: s, hub: h, q: q, reg: reg, ca: ca, stop: stop}
}

// metric returns a counter or gauge from the rig's registry.
func (r *rig) metric(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		var v float64
		for _, m := range mf.GetMetric() {
			v += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
		return v
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// device is a raw MQTT client on a real TLS connection.
type device struct {
	t   *testing.T
	id  string
	ver byte
	c   *tls.Conn
	r   *bufio.Reader
	// mayBeClosed: a write that fails because the gateway closed the
	// connection does not fail the test.
	mayBeClosed bool
}

func (r *rig) dial(t *testing.T, id string, ver byte) *device {
	t.Helper()
	d := r.dialTLS(t, id, ver, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: ver,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("CONNACK: got type %d reason 0x%02x", pk.FixedHeader.Type, pk.ReasonCode)
	}
	return d
}

// dialTLS makes the device's TLS connection, with a client certificate for
// id issued by the rig's CA if withCert, and sends nothing.
func (r *rig) dialTLS(t *testing.T, id string, ver byte, withCert bool) *device {
	t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1"}
	if !withCert {
		c, err := r.tlsDial(cfg)
		if err != nil {
			t.Fatalf("TLS to the MQTT server: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		return &device{t: t, id: id, ver: ver, c: c, r: bufio.NewReader(c)}
	}
	cert, _ := r.issue(t, id)
	return r.dialCert(t, id, ver, cert)
}

// issue has the rig's CA issue a certificate for device id, valid for an
// hour, and returns it with its key, and its leaf.
func (r *rig) issue(t *testing.T, id string) (tls.Certificate, *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := r.ca.IssueDevice(csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, r.ca.Issuer().Raw}, PrivateKey: key}, leaf
}

// dialCert makes the device's TLS connection with cert, and sends nothing.
func (r *rig) dialCert(t *testing.T, id string, ver byte, cert tls.Certificate) *device {
	t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1",
		Certificates: []tls.Certificate{cert}}
	c, err := r.tlsDial(cfg)
	if err != nil {
		t.Fatalf("TLS to the MQTT server: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &device{t: t, id: id, ver: ver, c: c, r: bufio.NewReader(c)}
}

func (d *device) send(pk packets.Packet) {
	d.t.Helper()
	var buf bytes.Buffer
	var err error
	pk.ProtocolVersion = d.ver
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Pingreq:
		err = pk.PingreqEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	default:
		err = fmt.Errorf("type %d not used here", pk.FixedHeader.Type)
	}
	if err != nil {
		d.t.Fatal(err)
	}
	d.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := d.c.Write(buf.Bytes()); err != nil && !d.mayBeClosed {
		d.t.Fatalf("device %s write: %v", d.id, err)
	}
}

func (d *device) publish(id uint16, n int) {
	d.t.Helper()
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id,
		TopicName: "devices/" + d.id + "/t/n", Payload: fmt.Appendf(nil, "msg %04d", n)})
}

// readErr reads one packet or returns the read error.
func (d *device) readErr(timeout time.Duration) (packets.Packet, error) {
	d.c.SetReadDeadline(time.Now().Add(timeout))
	b, err := d.r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{ProtocolVersion: d.ver}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(d.r)
	if err != nil {
		return pk, err
	}
	pk.FixedHeader.Remaining = n
	body := make([]byte, n)
	if _, err := io.ReadFull(d.r, body); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Pingresp:
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	default:
		err = fmt.Errorf("unexpected packet type %d", pk.FixedHeader.Type)
	}
	return pk, err
}

func (d *device) read(timeout time.Duration) packets.Packet {
	d.t.Helper()
	pk, err := d.readErr(timeout)
	if err != nil {
		d.t.Fatalf("device %s read: %v", d.id, err)
	}
	return pk
}

// ack is what the device saw: PUBACK id and reason, or PINGRESP (id 0).
type ack struct {
	Type   byte
	ID     uint16
	Reason byte
}

// readUntilClosed reads what the device gets until the connection ends
// (or 10 s pass with nothing), and the error that ended it.
func (d *device) readUntilClosed() ([]ack, error) {
	var got []ack
	for {
		pk, err := d.readErr(10 * time.Second)
		if err != nil {
			return got, err
		}
		got = append(got, ack{pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode})
	}
}

func (d *device) readAcks(n int) []ack {
	d.t.Helper()
	var got []ack
	for range n {
		pk := d.read(10 * time.Second)
		got = append(got, ack{pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode})
	}
	return got
}

// conn returns the server side of the device's session.
func (r *rig) conn(t *testing.T, id string) *pipeConn {
	t.Helper()
	cl, ok := r.s.mq.Clients.Get(id)
	if !ok {
		t.Fatalf("no session for %s", id)
	}
	pc, ok := cl.Net.Conn.(*pipeConn)
	if !ok {
		t.Fatalf("session conn is %T, not *pipeConn", cl.Net.Conn)
	}
	return pc
}

// heldPackets counts the whole MQTT packets the session holds and the
// messages it has waiting for the disk.
func (pc *pipeConn) heldPackets() (n, pending int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	b := pc.held
	for len(b) > 1 {
		size, used, err := packets.DecodeLength(bytes.NewReader(b[1:]))
		if err != nil || len(b) < 1+used+size {
			break
		}
		b = b[1+used+size:]
		n++
	}
	return n, int(pc.enq - pc.done)
}

// waitFor polls cond (bounded) for a state inside the server that has no
// event to wait on.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after 10s waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func successAcks(from, to uint16) []ack {
	var a []ack
	for id := from; id <= to; id++ {
		a = append(a, ack{packets.Puback, id, 0})
	}
	return a
}

// TestPubackWaitsForFsync: with the queue's fsync held, a device with 16
// QoS 1 messages in flight and a PINGREQ behind them gets nothing; once
// the fsync returns it gets the 16 PUBACKs in order, then the PINGRESP; the
// queue holds the messages in the order sent.
func TestPubackWaitsForFsync(t *testing.T) {
	hs := newHeldSync()
	r := newRig(t, queue.Options{Sync: hs.sync})
	defer hs.release(nil) // no-op if the test released it already
	d := r.dial(t, "dev-1", 5)
	fsyncs0 := r.metric(t, "bastion_queue_fsyncs_total")
	for i := range 16 {
		d.publish(uint16(i+1), i)
	}
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})

	select {
	case <-hs.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the queue never started an fsync")
	}
	pc := r.conn(t, "dev-1")
	// The session read all 17 packets and answered them into the hold.
	waitFor(t, "16 PUBACKs and a PINGRESP held", func() bool { n, _ := pc.heldPackets(); return n == 17 })
	if _, err := d.readErr(200 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("device read while the fsync is held: got %v, want a timeout (nothing sent)", err)
	}
	if got := r.metric(t, "bastion_queue_fsyncs_total") - fsyncs0; got != 0 {
		t.Fatalf("%v fsyncs completed while held", got)
	}

	hs.release(nil)
	want := append(successAcks(1, 16), ack{Type: packets.Pingresp})
	if diff := cmp.Diff(want, d.readAcks(17)); diff != "" {
		t.Errorf("device saw after the fsync (-want +got):\n%s", diff)
	}
	ents, err := r.q.Next(context.Background(), 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var gotPayloads, wantPayloads []string
	for i, e := range ents {
		gotPayloads = append(gotPayloads, string(e.Payload))
		wantPayloads = append(wantPayloads, fmt.Sprintf("msg %04d", i))
	}
	if len(ents) != 16 {
		t.Errorf("queue holds %d messages, want 16", len(ents))
	}
	if diff := cmp.Diff(wantPayloads, gotPayloads); diff != "" {
		t.Errorf("queue order (-want +got):\n%s", diff)
	}
	// Caught up: nothing waits, nothing is held, and no flusher goroutine
	// stays behind (goleak in TestMain checks the process too).
	waitFor(t, "the session's flusher to catch up and end", func() bool {
		pc.mu.Lock()
		defer pc.mu.Unlock()
		pc.nmu.Lock()
		defer pc.nmu.Unlock()
		return pc.enq == pc.done && len(pc.held) == 0 && !pc.running
	})
}

// TestFailedFsyncClosesSession: when the fsync that covers the held
// messages fails, the device gets no PUBACK at all and its connection is
// closed; reconnecting, it is refused (the queue refuses everything after a
// failed fsync) with MQTT 5 reason 0x97 rather than acknowledged. Each of
// the 16 messages not made durable is counted as refused once, as a disk
// error (not once per session close, and not as a full queue), for the
// transport and the device, and so is the refusal after reconnecting.
func TestFailedFsyncClosesSession(t *testing.T) {
	hs := newHeldSync()
	r := newRig(t, queue.Options{Sync: hs.sync})
	defer hs.release(nil) // no-op if the test released it already
	d := r.dial(t, "dev-2", 5)
	for i := range 16 {
		d.publish(uint16(i+1), i)
	}
	<-hs.entered
	pc := r.conn(t, "dev-2")
	waitFor(t, "16 PUBACKs held", func() bool { n, _ := pc.heldPackets(); return n == 16 })
	hs.release(errors.New("EIO from the test's disk"))

	got, err := d.readUntilClosed()
	if len(got) != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err)) {
		t.Fatalf("after a failed fsync the device saw %v then %v; want nothing, then the connection closed", got, err)
	}
	refused := r.hub.Metrics().Refused
	diskErrors := refused.WithLabelValues(hub.MQTT, hub.ReasonDiskError)
	waitFor(t, "16 refusals counted", func() bool { return testutil.ToFloat64(diskErrors) >= 16 })
	// Gone before the device comes back, else its return is a takeover
	// (counted as one) of a session still closing.
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })

	d2 := r.dial(t, "dev-2", 5)
	d2.publish(1, 0)
	if diff := cmp.Diff([]ack{{packets.Puback, 1, packets.ErrQuotaExceeded.Code}}, d2.readAcks(1)); diff != "" {
		t.Errorf("publish after the failed fsync (-want +got):\n%s", diff)
	}
	if n := testutil.ToFloat64(diskErrors); n != 17 {
		t.Errorf("refusals{mqtt,disk_error} = %v, want 17 (16 not made durable, 1 refused after reconnecting)", n)
	}
	if n := testutil.CollectAndCount(refused); n != 1 {
		t.Errorf("%d refusal series, want only {mqtt,disk_error}; got:\n%s", n, seriesOf(t, r.hub.Metrics().Refused))
	}
	if tr, _ := r.hub.Traffic("dev-2"); tr.MessagesIn != 16 || tr.Refused != 17 {
		t.Errorf("dev-2's counters %+v, want 16 in, 17 refused", tr)
	}
}

// TestQueueFullWhilePipelined: admission stays synchronous and exact. With
// room for a few messages only, a device pipelining 30 gets, with MQTT 5,
// PUBACK 0x00 for the first ones and then 0x97, in packet order, and the
// session stays usable (PINGRESP after them). MQTT 3.1.1 has no negative
// PUBACK, and its client sends an unacknowledged PUBLISH again only when it
// reconnects: the session is closed at the first refusal, having read
// nothing after it; the device gets at most the PUBACKs of the messages
// before it, in order.
func TestQueueFullWhilePipelined(t *testing.T) {
	for _, ver := range []byte{5, 4} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			r := newRig(t, queue.Options{MaxBytes: 1024, SegmentBytes: 1024})
			d := r.dial(t, fmt.Sprintf("dev-v%d", ver), ver)
			// MQTT 3.1.1: the gateway may close the connection while the
			// device is still writing; what it saw is checked below.
			d.mayBeClosed = ver == 4
			for i := range 30 {
				d.publish(uint16(i+1), i)
			}
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Pingreq}})
			var got []ack
			var end error
			if ver == 5 {
				for {
					pk := d.read(10 * time.Second)
					got = append(got, ack{pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode})
					if pk.FixedHeader.Type == packets.Pingresp {
						break
					}
				}
			} else {
				got, end = d.readUntilClosed()
			}
			// The messages admitted before the refusal are counted once
			// written; with MQTT 3.1.1 the session may have ended (nothing
			// waits for their PUBACKs) before the writer has written them.
			held := int(r.metric(t, "bastion_queue_depth"))
			for deadline := time.Now().Add(5 * time.Second); held == 0 && time.Now().Before(deadline); {
				time.Sleep(5 * time.Millisecond)
				held = int(r.metric(t, "bastion_queue_depth"))
			}
			if held == 0 || held == 30 {
				t.Fatalf("queue holds %d of 30: the test needs it to fill part way", held)
			}
			want := successAcks(1, uint16(held))
			if ver == 5 {
				for id := held + 1; id <= 30; id++ {
					want = append(want, ack{packets.Puback, uint16(id), packets.ErrQuotaExceeded.Code})
				}
				want = append(want, ack{Type: packets.Pingresp})
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("device saw, queue full after %d (-want +got):\n%s", held, diff)
				}
				return
			}
			if !(errors.Is(end, io.EOF) || errors.Is(end, net.ErrClosed) || isReset(end)) {
				t.Fatalf("MQTT 3.1.1 device saw %v, then %v; want the connection closed after the first refusal", got, end)
			}
			if len(got) > held || (len(got) > 0 && cmp.Diff(want[:len(got)], got) != "") {
				t.Errorf("MQTT 3.1.1 device saw %v before the close; want at most the PUBACKs 1..%d in order (queue full after %d)", got, held, held)
			}
			if refused := r.metric(t, "bastion_queue_refusals_total"); refused != 1 {
				t.Errorf("%v refusals counted by the queue, want 1: the session must read nothing after the first refusal", refused)
			}
		})
	}
}

// TestOneSessionGroupCommit: one device keeping 32 QoS 1 messages in flight
// (the receive maximum) over a real disk gets more than one message per
// fsync, and its PUBACKs and queue order are those it sent.
func TestOneSessionGroupCommit(t *testing.T) {
	const total, window = 512, 32
	r := newRig(t, queue.Options{})
	d := r.dial(t, "dev-3", 5)
	fsyncs0, acc0 := r.metric(t, "bastion_queue_fsyncs_total"), r.metric(t, "bastion_queue_accepted_total")
	sent := 0
	for ; sent < window; sent++ {
		d.publish(uint16(sent+1), sent)
	}
	var got []ack
	for len(got) < total {
		pk := d.read(10 * time.Second)
		got = append(got, ack{pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode})
		if sent < total {
			d.publish(uint16(sent%60000+1), sent)
			sent++
		}
	}
	if diff := cmp.Diff(successAcks(1, total), got); diff != "" {
		t.Errorf("PUBACKs (-want +got):\n%s", diff)
	}
	fsyncs, acc := r.metric(t, "bastion_queue_fsyncs_total")-fsyncs0, r.metric(t, "bastion_queue_accepted_total")-acc0
	t.Logf("%v messages accepted with %v fsyncs: %.1f messages per fsync", acc, fsyncs, acc/fsyncs)
	if acc != total || acc/fsyncs <= 1 {
		t.Errorf("%v messages with %v fsyncs: want %d messages and more than one per fsync", acc, fsyncs, total)
	}
	ents, err := r.q.Next(context.Background(), 0, total+1)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range ents {
		if want := fmt.Sprintf("msg %04d", i); string(e.Payload) != want {
			t.Fatalf("queue entry %d is %q, want %q (order per device)", i, e.Payload, want)
		}
	}
	if len(ents) != total {
		t.Errorf("queue holds %d, want %d", len(ents), total)
	}
}

// TestNoGoroutineWaitsForTheDisk: sessions whose PUBACKs wait for a held
// fsync have no goroutine of their own parked meanwhile (the queue calls
// each session back after the fsync, which then starts one flusher); once
// the fsync returns every device gets its PUBACKs and the flushers end.
func TestNoGoroutineWaitsForTheDisk(t *testing.T) {
	hs := newHeldSync()
	r := newRig(t, queue.Options{Sync: hs.sync})
	defer hs.release(nil)
	const sessions = 5
	var devs []*device
	for i := range sessions {
		d := r.dial(t, fmt.Sprintf("dev-g%d", i), 5)
		for k := range 3 {
			d.publish(uint16(k+1), k)
		}
		devs = append(devs, d)
	}
	<-hs.entered
	for i := range sessions {
		pc := r.conn(t, fmt.Sprintf("dev-g%d", i))
		waitFor(t, "3 PUBACKs held", func() bool {
			n, pending := pc.heldPackets()
			return n+pending >= 3 && pending > 0
		})
	}
	if n := flushers(); n != 0 {
		t.Fatalf("%d pipeConn flusher goroutines while every message waits for the fsync; want 0", n)
	}
	hs.release(nil)
	for _, d := range devs {
		if diff := cmp.Diff(successAcks(1, 3), d.readAcks(3)); diff != "" {
			t.Errorf("PUBACKs (-want +got):\n%s", diff)
		}
	}
	waitFor(t, "the flushers to end", func() bool { return flushers() == 0 })
}

// flushers counts the goroutines running pipeConn.flush.
func flushers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return bytes.Count(buf, []byte("mqtt.(*pipeConn).flush("))
}

// TestPipelineBoundsMessages: an MQTT 3.1.1 device (no receive maximum)
// pipelining 100 QoS 1 messages while the fsync is held gets exactly
// maxPipelined of them admitted; the session reads no further until the
// disk catches up, then all 100 are acknowledged in order.
func TestPipelineBoundsMessages(t *testing.T) {
	hs := newHeldSync()
	r := newRig(t, queue.Options{Sync: hs.sync})
	defer hs.release(nil) // no-op if the test released it already
	d := r.dial(t, "dev-4", 4)
	for i := range 100 {
		d.publish(uint16(i+1), i)
	}
	<-hs.entered
	pc := r.conn(t, "dev-4")
	waitFor(t, "the session to reach its bound", func() bool { _, p := pc.heldPackets(); return p == maxPipelined })
	time.Sleep(100 * time.Millisecond) // a bound that does not hold would admit more meanwhile
	if _, p := pc.heldPackets(); p != maxPipelined {
		t.Fatalf("%d messages waiting for the disk, want the bound %d", p, maxPipelined)
	}
	if n := r.metric(t, "bastion_transport_messages_total"); n != maxPipelined {
		t.Fatalf("%v messages admitted while the fsync is held, want the bound %d", n, maxPipelined)
	}
	hs.release(nil)
	if diff := cmp.Diff(successAcks(1, 100), d.readAcks(100)); diff != "" {
		t.Errorf("PUBACKs (-want +got):\n%s", diff)
	}
}

// TestPipelineHoldsCommandsInOrder: commands for the device that the
// gateway sends while a PUBACK waits for the fsync are held behind it (the
// device sees the bytes in the order the broker wrote them), the bytes held
// stay within maxHeldBytes (the broker's writer waits), and all arrive,
// in order, once the fsync returns.
func TestPipelineHoldsCommandsInOrder(t *testing.T) {
	hs := newHeldSync()
	// 80 KiB of commands, past the broker's default MaxHeldBytes (the
	// bound of what waits behind the barrier is pipeConn's, tested here).
	r := newRigWith(t, queue.Options{Sync: hs.sync}, Config{MaxHeldBytes: 1 << 20}, nil)
	defer hs.release(nil) // no-op if the test released it already
	const dev, cmds, size = "dev-5", 20, 4 << 10
	d := r.dial(t, dev, 5)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 7,
		Filters: packets.Subscriptions{{Filter: "devices/" + dev + "/c/#"}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback || pk.PacketID != 7 {
		t.Fatalf("SUBACK: got type %d id %d", pk.FixedHeader.Type, pk.PacketID)
	}
	d.publish(1, 0)
	<-hs.entered
	pc := r.conn(t, dev)
	waitFor(t, "the PUBACK held", func() bool { n, _ := pc.heldPackets(); return n == 1 })
	for i := range cmds {
		payload := bytes.Repeat([]byte{byte('a' + i)}, size)
		if err := r.hub.Deliver(context.Background(), bridges.Message{Device: dev, Topic: fmt.Sprintf("devices/%s/c/%02d", dev, i), Payload: payload}); err != nil {
			t.Fatal(err)
		}
	}
	fit := (maxHeldBytes - 4) / (size + 30) // PUBACK, then whole command PUBLISHes
	waitFor(t, "commands held up to the bound", func() bool { n, _ := pc.heldPackets(); return n >= 1+fit })
	pc.mu.Lock()
	held := len(pc.held)
	pc.mu.Unlock()
	if held > maxHeldBytes {
		t.Fatalf("%d bytes held, bound %d", held, maxHeldBytes)
	}
	if _, err := d.readErr(100 * time.Millisecond); !isTimeout(err) {
		t.Fatalf("device read while the fsync is held: %v, want nothing", err)
	}
	hs.release(nil)
	type seen struct {
		Type  byte
		ID    uint16
		Topic string
		First byte
	}
	want := []seen{{Type: packets.Puback, ID: 1}}
	for i := range cmds {
		want = append(want, seen{Type: packets.Publish, Topic: fmt.Sprintf("devices/%s/c/%02d", dev, i), First: byte('a' + i)})
	}
	var got []seen
	for range want {
		pk := d.read(10 * time.Second)
		sn := seen{Type: pk.FixedHeader.Type, Topic: pk.TopicName}
		if pk.FixedHeader.Type == packets.Puback {
			sn.ID = pk.PacketID
		}
		if len(pk.Payload) > 0 {
			sn.First = pk.Payload[0]
		}
		got = append(got, sn)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("device saw (-want +got):\n%s", diff)
	}
}

func isReset(err error) bool {
	return err != nil && (errors.Is(err, os.ErrDeadlineExceeded) == false) && bytes.Contains([]byte(err.Error()), []byte("reset"))
}

// TestSetDeadlineCoalesced: pipeConn keeps a deadline already set when the
// new one is at most deadlineSlack earlier than it, so mochi's per-packet
// refresh does not reset the timers every packet; the connection never
// times out before the deadline asked for, a shorter deadline is applied,
// and a zero one clears it.
func TestSetDeadlineCoalesced(t *testing.T) {
	// A read on a TLS server connection that never handshakes waits for
	// the ClientHello until the deadline.
	readTimesOut := func(pc *pipeConn) (time.Time, error) {
		_, err := pc.Read(make([]byte, 1))
		return time.Now(), err
	}
	conn := func() *pipeConn {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		return newPipeConn(tls.Server(a, &tls.Config{}), nil)
	}

	pc := conn()
	first := time.Now().Add(100 * time.Millisecond)
	if err := pc.SetDeadline(first); err != nil {
		t.Fatal(err)
	}
	set := pc.deadline.Load()
	later := first.Add(deadlineSlack / 2)
	if err := pc.SetDeadline(later); err != nil {
		t.Fatal(err)
	}
	if got := pc.deadline.Load(); got != set {
		t.Errorf("a deadline within the slack reset the timers: %v, want %v kept", time.Unix(0, got), time.Unix(0, set))
	}
	at, err := readTimesOut(pc)
	if !isTimeout(err) {
		t.Fatalf("read: %v, want a timeout", err)
	}
	if at.Before(later) {
		t.Errorf("timed out at %v, before the deadline asked for, %v", at, later)
	}

	pc = conn()
	pc.SetDeadline(time.Now().Add(time.Hour))
	short := time.Now().Add(50 * time.Millisecond)
	pc.SetDeadline(short)
	if got := time.Unix(0, pc.deadline.Load()); got.Before(short) || got.After(short.Add(deadlineSlack)) {
		t.Errorf("shorter deadline %v set as %v", short, got)
	}
	if _, err := readTimesOut(pc); !isTimeout(err) {
		t.Fatalf("read after a shorter deadline: %v, want a timeout", err)
	}

	pc = conn()
	pc.SetDeadline(time.Now().Add(time.Hour))
	pc.SetDeadline(time.Time{})
	if got := pc.deadline.Load(); got != 0 {
		t.Errorf("zero deadline left %v", time.Unix(0, got))
	}
}

// TestRefusalBehindAnFsyncReleasesNothing: messages refused at once (the
// queue full) while earlier ones wait for their fsync settle without the
// Sink. That must not count the earlier ones durable: with the fsync held
// the device gets nothing, neither the refusals nor the PUBACKs of the
// waiting messages; released, it gets the PUBACKs, then the refusals, in
// packet order; failed, it gets nothing and its connection is closed (a
// PUBACK sent before the fsync would acknowledge a message the failed
// fsync lost). The same holds for a message the Sink withholds without
// queueing it (privacy rules): unreserve is the same path.
func TestRefusalBehindAnFsyncReleasesNothing(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(fmt.Sprintf("fsync fails %v", fail), func(t *testing.T) {
			hs := newHeldSync()
			r := newRig(t, queue.Options{Sync: hs.sync, MaxBytes: 1024, SegmentBytes: 1024})
			defer hs.release(nil)
			d := r.dial(t, "dev-r", 5)
			const n = 30
			for i := range n {
				d.publish(uint16(i+1), i)
			}
			<-hs.entered
			pc := r.conn(t, "dev-r")
			waitFor(t, "every PUBLISH registered", func() bool {
				pc.mu.Lock()
				defer pc.mu.Unlock()
				return pc.enq == n
			})
			refused := r.metric(t, "bastion_queue_refusals_total")
			if refused == 0 {
				t.Fatal("no message was refused: the test needs the queue to fill while the fsync is held")
			}
			if pk, err := d.readErr(300 * time.Millisecond); !isTimeout(err) {
				t.Fatalf("while the fsync is held the device got type %d id %d reason 0x%02x (err %v); want nothing", pk.FixedHeader.Type, pk.PacketID, pk.ReasonCode, err)
			}
			if fail {
				hs.release(errors.New("EIO from the test's disk"))
				if got, err := d.readUntilClosed(); len(got) != 0 {
					t.Fatalf("after the failed fsync the device saw %v; want nothing, then the connection closed (%v)", got, err)
				}
				return
			}
			hs.release(nil)
			ok := n - int(refused)
			want := successAcks(1, uint16(ok))
			for id := ok + 1; id <= n; id++ {
				want = append(want, ack{packets.Puback, uint16(id), packets.ErrQuotaExceeded.Code})
			}
			if diff := cmp.Diff(want, d.readAcks(n)); diff != "" {
				t.Errorf("device saw after the fsync (-want +got):\n%s", diff)
			}
		})
	}
}

// TestSettleOrder drives a session's bookkeeping directly: messages the
// Sink took (reported later, in order) interleaved with messages settled
// at once (refused or withheld). durable, the prefix whose PUBACKs may go
// out, never passes a message the Sink has not reported.
func TestSettleOrder(t *testing.T) {
	c := newPipeConn(nil, &tlsListener{})
	c.flushFn = func() { c.l.wg.Done() } // no connection: count only
	type step struct {
		op   string // "sink" (taken by the Sink), "now" (settled at once), "report"
		want uint64 // durable after the step
	}
	steps := []step{
		{"sink", 0}, {"now", 0}, {"sink", 0}, {"now", 0}, {"now", 0}, // 1 S, 2 now, 3 S, 4-5 now
		{"report", 2},                        // 1 durable; 2 follows it
		{"report", 5},                        // 3 durable; 4 and 5 follow
		{"now", 6},                           // 6: nothing waits before it
		{"sink", 6}, {"sink", 6}, {"now", 6}, // 7 S, 8 S, 9 now
		{"report", 7}, {"report", 9},
	}
	for i, s := range steps {
		switch s.op {
		case "sink", "now":
			if err := c.reserve("dev"); err != nil {
				t.Fatal(err)
			}
			if s.op == "now" {
				c.mu.Lock()
				n := c.enq
				c.mu.Unlock()
				c.settleNow(n)
			}
		case "report":
			c.reported(nil)
		}
		c.nmu.Lock()
		got := c.durable
		c.nmu.Unlock()
		if got != s.want {
			t.Fatalf("step %d (%s): durable %d, want %d", i, s.op, got, s.want)
		}
		c.mu.Lock()
		c.done = got // as the flusher would, so reserve has room
		c.mu.Unlock()
	}
	c.l.wg.Wait()
}

// seriesOf lists a counter vector's series and values, for failure messages.
func seriesOf(t *testing.T, c prometheus.Collector) string {
	t.Helper()
	ch := make(chan prometheus.Metric, 64)
	go func() { c.Collect(ch); close(ch) }()
	var b strings.Builder
	for m := range ch {
		var pm dto.Metric
		if err := m.Write(&pm); err != nil {
			t.Fatal(err)
		}
		for _, l := range pm.GetLabel() {
			fmt.Fprintf(&b, "%s=%s ", l.GetName(), l.GetValue())
		}
		fmt.Fprintf(&b, "%v\n", pm.GetCounter().GetValue())
	}
	return b.String()
}

package upstream

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// fakeBroker is a scripted MQTT v5 broker over TLS 1.3 with client
// certificates, on 127.0.0.1:0, for what a real broker cannot be made to do
// on cue (refuse one message with 0x97 and accept the next) or to show
// (the options of the link's SUBSCRIBE). It answers CONNECT and SUBSCRIBE
// itself and hands every PUBLISH to the test, which answers with PUBACKs.
type fakeBroker struct {
	addr  string
	ca    *testpki.CA
	ln    net.Listener
	conns chan *fakeConn
	wg    sync.WaitGroup
	mu    sync.Mutex
	open  []net.Conn
	// refuseSubs: the next this many SUBSCRIBEs are answered with this
	// reason for every filter (0: granted).
	refuseSubs   atomic.Int32
	refuseReason byte
	// refuseConnects: the next this many CONNECTs are answered with a
	// CONNACK refusing them (0x87, not authorized), then closed.
	refuseConnects atomic.Int32
	// deaf (set by an option): after its CONNACK the broker reads nothing
	// more, through a small receive buffer, until it is closed (quit).
	deaf bool
	quit chan struct{}
	// autoAck (set by an option): the broker answers every PUBLISH with a
	// PUBACK itself and sends its topic to acked; one whose topic has more
	// than closeAbove levels (0: no limit) it answers by closing the
	// connection, as AWS IoT Core does for a topic beyond its limits.
	autoAck    bool
	closeAbove int
	acked      chan string
	closes     atomic.Int32 // connections closed on such a PUBLISH
	// script (set by an option), with autoAck, answers a PUBLISH instead
	// (nil: the PUBACK above); ackedPubs, if set, gets every PUBLISH
	// answered with a success PUBACK.
	script    func(c *fakeConn, p *packets.Publish) fakeAnswer
	ackedPubs chan *packets.Publish
	// recvMax, if set, is the Receive Maximum of the CONNACK.
	recvMax uint16
	// connects counts CONNACKed connections; disconnects the DISCONNECTs
	// the broker sent.
	connects, disconnects atomic.Int32
}

// fakeAnswer is a scripted broker's answer to one PUBLISH.
type fakeAnswer struct {
	puback     byte // the PUBACK's reason code
	disconnect bool // no PUBACK: a DISCONNECT with reason, and the connection ends
	reason     byte
	close      bool // no PUBACK: the connection closes (no DISCONNECT)
	// hold: a success PUBACK, not sent yet: it goes out with the next
	// answer that is not held, in the same write.
	hold bool
}

// fakeConn is one client connection to a fakeBroker.
type fakeConn struct {
	b    *fakeBroker
	conn net.Conn
	wmu  sync.Mutex
	pubs chan *packets.Publish   // in the order received
	subs chan *packets.Subscribe // in the order received
	done chan struct{}           // closed when the connection ends
	// connect is the link's CONNECT (set before the connection is handed
	// to the test).
	connect *packets.Connect
	// index is the connection's number on the broker (from 1); seen counts
	// each bastion-seq's PUBLISHes on it (for a script).
	index int
	seen  map[uint64]int
	// held are the PUBLISHes whose PUBACK a script held (fakeAnswer.hold).
	held []*packets.Publish
}

func startFakeBroker(t *testing.T, opts ...func(*fakeBroker)) *fakeBroker {
	t.Helper()
	ca := testpki.New(t, t.TempDir(), "fake")
	srv := ca.Server(t, "fake-server", "fake.test", "127.0.0.1")
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{srv.TLS},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
	}
	b := &fakeBroker{ca: ca, conns: make(chan *fakeConn, 16), quit: make(chan struct{}), acked: make(chan string, 1024)}
	for _, o := range opts {
		o(b)
	}
	var lc net.ListenConfig
	if b.deaf {
		// Accepted connections inherit it: what the link writes fills
		// the buffers after a few MiB instead of tens.
		lc.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) }); err != nil {
				return err
			}
			return serr
		}
	}
	raw, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fake broker: listen: %v", err)
	}
	ln := tls.NewListener(raw, tc)
	b.addr, b.ln = ln.Addr().String(), ln
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.open = append(b.open, c)
			b.mu.Unlock()
			fc := &fakeConn{b: b, conn: c, pubs: make(chan *packets.Publish, 1024), subs: make(chan *packets.Subscribe, 16), done: make(chan struct{})}
			b.wg.Add(1)
			go func() {
				defer b.wg.Done()
				defer close(fc.done)
				defer c.Close()
				fc.serve(t, b.conns)
			}()
		}
	}()
	t.Cleanup(b.close)
	return b
}

func (b *fakeBroker) close() {
	close(b.quit)
	b.ln.Close()
	b.mu.Lock()
	for _, c := range b.open {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// config is a link configuration for gateway gw1 trusting the fake broker.
func (b *fakeBroker) config(t *testing.T) Config {
	leaf := b.ca.Client(t, "gw1")
	return Config{
		Broker: "mqtts://" + b.addr, ServerName: "fake.test",
		CAFile: b.ca.CertFile, CertFile: leaf.CertFile, KeyFile: leaf.KeyFile,
		Gateway:    "gw1",
		BackoffMin: 20 * time.Millisecond, BackoffMax: 300 * time.Millisecond,
		ConnectTimeout: 2 * time.Second,
		Forward:        []Rule{{Topic: "devices/+/t/#", Action: ActionForward}},
	}
}

// next waits for the link's next connection (after its CONNACK).
func (b *fakeBroker) next(t *testing.T) *fakeConn {
	t.Helper()
	select {
	case c := <-b.conns:
		return c
	case <-time.After(10 * time.Second):
		t.Fatalf("the link did not connect to the fake broker")
		return nil
	}
}

func (c *fakeConn) serve(t *testing.T, conns chan<- *fakeConn) {
	for {
		cp, err := packets.ReadPacket(c.conn)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				t.Logf("fake broker: read: %v", err)
			}
			return
		}
		switch p := cp.Content.(type) {
		case *packets.Connect:
			c.connect = p
			if c.b.refuseConnects.Add(-1) >= 0 {
				c.write(&packets.Connack{ReasonCode: 0x87, Properties: &packets.Properties{}})
				return
			}
			ca := &packets.Connack{Properties: &packets.Properties{}}
			if c.b.recvMax > 0 {
				ca.Properties.ReceiveMaximum = &c.b.recvMax
			}
			if c.write(ca) != nil {
				return
			}
			c.index = int(c.b.connects.Add(1))
			select { // a test that reconnects often need not take them all
			case conns <- c:
			case <-c.b.quit:
				return
			}
			if c.b.deaf {
				<-c.b.quit
				return
			}
		case *packets.Subscribe:
			granted := make([]byte, len(p.Subscriptions))
			refuse := c.b.refuseSubs.Add(-1) >= 0
			for i, s := range p.Subscriptions {
				granted[i] = s.QoS
				if refuse {
					granted[i] = c.b.refuseReason
				}
			}
			c.subs <- p
			if c.write(&packets.Suback{PacketID: p.PacketID, Reasons: granted, Properties: &packets.Properties{}}) != nil {
				return
			}
		case *packets.Publish:
			if !c.b.autoAck {
				c.pubs <- p
				continue
			}
			if c.b.closeAbove > 0 && strings.Count(p.Topic, "/")+1 > c.b.closeAbove {
				c.b.closes.Add(1)
				return
			}
			var a fakeAnswer
			if c.b.script != nil {
				if c.seen == nil {
					c.seen = map[uint64]int{}
				}
				c.seen[seqOf(t, p)]++
				a = c.b.script(c, p)
			}
			switch {
			case a.close:
				c.b.closes.Add(1)
				return
			case a.disconnect:
				c.disconnect(a.reason)
				return
			}
			if a.hold {
				c.held = append(c.held, p)
				continue
			}
			var b bytes.Buffer
			for _, h := range c.held {
				(&packets.Puback{PacketID: h.PacketID, Properties: &packets.Properties{}}).WriteTo(&b)
			}
			(&packets.Puback{PacketID: p.PacketID, ReasonCode: a.puback, Properties: &packets.Properties{}}).WriteTo(&b)
			c.wmu.Lock()
			_, err := c.conn.Write(b.Bytes())
			c.wmu.Unlock()
			if err != nil {
				return
			}
			answered := c.held
			c.held = nil
			if a.puback < 0x80 {
				answered = append(answered, p)
			}
			for _, p := range answered {
				c.b.acked <- p.Topic
				if c.b.ackedPubs != nil {
					c.b.ackedPubs <- p
				}
			}
		case *packets.Pingreq:
			if c.write(&packets.Pingresp{}) != nil {
				return
			}
		case *packets.Disconnect:
			return
		}
	}
}

// disconnect sends a DISCONNECT with reason rc and ends the connection as
// a broker does: it stops writing (TLS close_notify), and reads what the
// link still sends until the link closes, so that no reset takes the
// DISCONNECT with it.
func (c *fakeConn) disconnect(rc byte) {
	c.b.disconnects.Add(1)
	if c.write(&packets.Disconnect{ReasonCode: rc, Properties: &packets.Properties{}}) != nil {
		return
	}
	if tc, ok := c.conn.(*tls.Conn); ok {
		tc.CloseWrite()
	}
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.Copy(io.Discard, c.conn)
}

func (c *fakeConn) write(p interface {
	WriteTo(io.Writer) (int64, error)
}) error {
	var b bytes.Buffer
	if _, err := p.WriteTo(&b); err != nil {
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.conn.Write(b.Bytes())
	return err
}

// publishes waits for n PUBLISHes.
func (c *fakeConn) publishes(t *testing.T, n int) []*packets.Publish {
	t.Helper()
	var out []*packets.Publish
	for len(out) < n {
		select {
		case p := <-c.pubs:
			out = append(out, p)
		case <-time.After(10 * time.Second):
			t.Fatalf("fake broker got %d of %d PUBLISHes", len(out), n)
		}
	}
	return out
}

// puback answers PUBLISHes, all in one write (one TLS record: the link
// reads them together).
func (c *fakeConn) puback(t *testing.T, acks ...*packets.Puback) {
	t.Helper()
	var b bytes.Buffer
	for _, a := range acks {
		if _, err := a.WriteTo(&b); err != nil {
			t.Fatal(err)
		}
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.conn.Write(b.Bytes()); err != nil {
		t.Fatalf("fake broker: write PUBACKs: %v", err)
	}
}

// seqOf is the bastion-seq of a PUBLISH from the link.
func seqOf(t *testing.T, p *packets.Publish) uint64 {
	t.Helper()
	if p.Properties != nil {
		for _, u := range p.Properties.User {
			if u.Key == SeqProperty {
				n, err := strconv.ParseUint(u.Value, 10, 64)
				if err != nil {
					t.Fatalf("%s %q: %v", SeqProperty, u.Value, err)
				}
				return n
			}
		}
	}
	t.Fatalf("PUBLISH %s without %s", p.Topic, SeqProperty)
	return 0
}

// TestRefusalKeepsDeviceOrder: the broker refuses d1's first message with
// 0x97 (quota exceeded: retried) and accepts everything after it in the same
// read. d1's second message must not be deleted on that PUBACK (it would
// reach the cloud before the first, which is resent only after the pause):
// both stay queued and are resent in order, first then second. d2's
// messages, accepted in the same read, are deleted (order is per device).
func TestRefusalKeepsDeviceOrder(t *testing.T) {
	fb := startFakeBroker(t)
	dir := t.TempDir()
	q, err := queue.Open(dir, queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	// In the queue before the link starts, so that one run sends all four.
	for _, m := range []bridges.Message{telemetry("d1", 0), telemetry("d2", 0), telemetry("d1", 1), telemetry("d2", 1)} {
		if err := q.Accept(context.Background(), m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	l := startLink(t, fb.config(t), dir)
	c := fb.next(t)
	first := c.publishes(t, 4)
	var got []string
	for _, p := range first {
		got = append(got, p.Topic)
	}
	if d := cmp.Diff([]string{"bastion/gw1/d1/t/n", "bastion/gw1/d2/t/n", "bastion/gw1/d1/t/n", "bastion/gw1/d2/t/n"}, got); d != "" {
		t.Fatalf("first run's PUBLISHes (-want +got):\n%s", d)
	}
	d1a, d1b := seqOf(t, first[0]), seqOf(t, first[2])
	c.puback(t,
		&packets.Puback{PacketID: first[0].PacketID, ReasonCode: 0x97, Properties: &packets.Properties{}},
		&packets.Puback{PacketID: first[1].PacketID, Properties: &packets.Properties{}},
		&packets.Puback{PacketID: first[2].PacketID, Properties: &packets.Properties{}},
		&packets.Puback{PacketID: first[3].PacketID, Properties: &packets.Properties{}},
	)
	// d2's messages are deleted by the same read's queue Ack that would
	// have deleted d1's second: once they are gone, the queue shows what
	// that read kept.
	held := func() []uint64 {
		es, err := l.q.Held(0, 10)
		if err != nil {
			t.Fatalf("Held: %v", err)
		}
		var seqs []uint64
		for _, e := range es {
			seqs = append(seqs, e.Seq)
		}
		return seqs
	}
	waitFor(t, "d2's messages deleted", 10*time.Second, func() bool { return len(held()) <= 2 })
	if d := cmp.Diff([]uint64{d1a, d1b}, held()); d != "" {
		t.Fatalf("held after PUBACK 0x97 for d1's first, success for the rest (-want +got):\n%s", d)
	}

	// The resend: d1's first, then its second. (d2's would only come again
	// if the next run read the queue before that read's Ack: allowed, and
	// answered.)
	var again []uint64
	for len(again) < 2 {
		p := c.publishes(t, 1)[0]
		c.puback(t, &packets.Puback{PacketID: p.PacketID, Properties: &packets.Properties{}})
		if p.Topic == "bastion/gw1/d1/t/n" {
			again = append(again, seqOf(t, p))
		}
	}
	if d := cmp.Diff([]uint64{d1a, d1b}, again); d != "" {
		t.Fatalf("d1's messages resent (-want +got):\n%s", d)
	}
	waitFor(t, "queue drained", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if n := l.up.Status().Published; n != 4 {
		t.Errorf("Published = %d, want 4 (d2's two in the first run, d1's two in the second)", n)
	}
}

// TestSubscribeNoLocal: the link's downlink SUBSCRIBE asks for no-local, so
// the broker never sends the gateway its own PUBLISHes (TestEndToEnd cannot
// show it: the config check keeps the default mappings apart, so nothing
// would come back without it either), and Retain Handling 2, so it sends no
// retained message on subscribing (TestRetainedCommandNotReplayed).
func TestSubscribeNoLocal(t *testing.T) {
	fb := startFakeBroker(t)
	startLink(t, fb.config(t), t.TempDir())
	c := fb.next(t)
	select {
	case s := <-c.subs:
		want := []packets.SubOptions{{Topic: "bastion/gw1/+/c/#", QoS: 1, NoLocal: true, RetainHandling: 2}}
		if d := cmp.Diff(want, s.Subscriptions); d != "" {
			t.Errorf("the link's SUBSCRIBE (-want +got):\n%s", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the link did not subscribe")
	}
}

// TestConnectLimitsCommandSize: the link's CONNECT announces a Maximum
// Packet Size, so the broker never sends it a command larger than any
// device transport takes (a command is kept in memory until its device
// takes it), and a Receive Maximum, so the broker keeps at most that many
// commands unacknowledged at the link (unset, it is 65,535).
func TestConnectLimitsCommandSize(t *testing.T) {
	fb := startFakeBroker(t)
	startLink(t, fb.config(t), t.TempDir())
	c := fb.next(t)
	p := c.connect.Properties
	if p == nil || p.MaximumPacketSize == nil || *p.MaximumPacketSize != maxDownlinkPacket {
		t.Fatalf("the link's CONNECT properties %+v: want Maximum Packet Size %d", p, maxDownlinkPacket)
	}
	if p.ReceiveMaximum == nil || *p.ReceiveMaximum != downlinkReceiveMaximum {
		t.Fatalf("the link's CONNECT Receive Maximum %v: want %d", p.ReceiveMaximum, downlinkReceiveMaximum)
	}
}

// TestDownlinkSubscriptionRetried: the broker refuses the link's downlink
// subscription twice (SUBACK 0x87), then grants it. The link says why and
// what to do, shows it in Status and the metrics, and asks again on the
// same connection; once granted, commands arrive. (A refusal used to be
// reported once, and commands were lost until something else made the link
// reconnect.)
func TestDownlinkSubscriptionRetried(t *testing.T) {
	fb := startFakeBroker(t)
	fb.refuseReason = 0x87
	fb.refuseSubs.Store(2)
	l := startLink(t, fb.config(t), t.TempDir())
	c := fb.next(t)
	for i := range 3 {
		select {
		case <-c.subs:
		case <-time.After(10 * time.Second):
			t.Fatalf("the link sent %d SUBSCRIBEs, want 3 (two refused, then granted); status %+v", i, l.up.Status())
		}
	}
	waitFor(t, "the downlink subscribed", 10*time.Second, func() bool { return l.up.Status().DownlinkSubscribed })
	st := l.up.Status()
	if !strings.Contains(st.LastError, `refused the downlink subscription "bastion/gw1/+/c/#" with SUBACK reason 0x87: not authorized; allow this gateway's client`) {
		t.Errorf("LastError %q, want the refusal with its reason and what to do", st.LastError)
	}
	if v := metric(t, l, "bastion_upstream_subscribe_errors_total"); v != 2 {
		t.Errorf("bastion_upstream_subscribe_errors_total = %v, want 2", v)
	}
	if v := metric(t, l, "bastion_upstream_downlink_subscribed"); v != 1 {
		t.Errorf("bastion_upstream_downlink_subscribed = %v, want 1", v)
	}
	if err := c.write(&packets.Publish{Topic: "bastion/gw1/dev1/c/led", QoS: 1, PacketID: 1, Payload: []byte("on"), Properties: &packets.Properties{}}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-l.commands:
		if m.Device != "dev1" || m.Topic != "devices/dev1/c/led" {
			t.Fatalf("command %+v, want devices/dev1/c/led for dev1", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the command never arrived; status %+v", l.up.Status())
	}
	select {
	case <-fb.conns:
		t.Errorf("the link reconnected; want the subscription asked again on the same connection")
	default:
	}
}

// TestConnectClearsLastError: the broker refuses the first CONNECT; once
// the link is connected, Status().LastError no longer shows that refusal
// beside connected: true (bastionctl status showed an old error as if it
// were current), and LastErrorBeforeConnect keeps it.
func TestConnectClearsLastError(t *testing.T) {
	fb := startFakeBroker(t)
	fb.refuseConnects.Store(1)
	l := startLink(t, fb.config(t), t.TempDir())
	fb.next(t)
	waitFor(t, "connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	st := l.up.Status()
	if st.LastError != "" || !st.LastErrorAt.IsZero() {
		t.Errorf("connected, LastError %q at %v; want none (the refusal came before this connection)", st.LastError, st.LastErrorAt)
	}
	if !strings.Contains(st.LastErrorBeforeConnect, "server denied connect (reason: 135)") || st.LastErrorBeforeAt.IsZero() || st.LastErrorBeforeAt.After(st.ConnectedSince) {
		t.Errorf("LastErrorBeforeConnect %q at %v (connected since %v); want the refused CONNECT, before the connection", st.LastErrorBeforeConnect, st.LastErrorBeforeAt, st.ConnectedSince)
	}
}

// clientValid issues a client certificate from ca valid from notBefore to
// notAfter (testpki's are valid now), as files.
func clientValid(t *testing.T, ca *testpki.CA, cn string, notBefore, notAfter time.Time) (certFile, keyFile string) {
	t.Helper()
	l := ca.ClientValid(t, cn, notBefore, notAfter)
	return l.CertFile, l.KeyFile
}

// TestReloadRefusesCertNotValidNow: a reload with an expired client
// certificate, or one not valid yet, is refused with what to do, and the
// running one stays (it was installed, and the working link went down on
// it). A certificate that expires within a week is installed, and Status
// says so.
func TestReloadRefusesCertNotValidNow(t *testing.T) {
	fb := startFakeBroker(t)
	cfg := fb.config(t)
	now := time.Now()
	cfg.CertFile, cfg.KeyFile = clientValid(t, fb.ca, "gw1", now.Add(-time.Hour), now.Add(365*24*time.Hour))
	l := startLink(t, cfg, t.TempDir())
	fb.next(t)
	waitFor(t, "connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	old := l.up.Status()
	if !strings.Contains(old.ClientCertSubject, "gw1") || old.ClientCertWarning != "" {
		t.Fatalf("status before: subject %q, warning %q; want gw1 and no warning", old.ClientCertSubject, old.ClientCertWarning)
	}
	for name, tc := range map[string]struct {
		from, until time.Time
		want        string
	}{
		"expired": {now.Add(-48 * time.Hour), now.Add(-time.Hour), "expired at"},
		"not yet": {now.Add(time.Hour), now.Add(48 * time.Hour), "is valid only from"},
	} {
		bad := cfg
		bad.CertFile, bad.KeyFile = clientValid(t, fb.ca, "gw1-"+strings.ReplaceAll(name, " ", "-"), tc.from, tc.until)
		err := l.up.Reload(bad)
		if err == nil || !strings.Contains(err.Error(), "keeping the running configuration") || !strings.Contains(err.Error(), "upstream.cert_file "+bad.CertFile) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Reload: %v; want a refusal naming upstream.cert_file and %q", name, err, tc.want)
		}
		if st := l.up.Status(); st.ClientCertSubject != old.ClientCertSubject || !st.ClientCertNotAfter.Equal(old.ClientCertNotAfter) {
			t.Errorf("%s: after the refused reload, status subject %q until %v; want the running %q until %v", name, st.ClientCertSubject, st.ClientCertNotAfter, old.ClientCertSubject, old.ClientCertNotAfter)
		}
	}
	if v := metric(t, l, "bastion_upstream_reloads_total"); v != 2 {
		t.Errorf("bastion_upstream_reloads_total = %v, want 2 (refused)", v)
	}

	soon := cfg
	soon.CertFile, soon.KeyFile = clientValid(t, fb.ca, "gw1-soon", now.Add(-time.Hour), now.Add(3*24*time.Hour))
	if err := l.up.Reload(soon); err != nil {
		t.Fatalf("Reload with a certificate valid for 3 more days: %v", err)
	}
	if st := l.up.Status(); st.ClientCertSubject != "CN=gw1-soon" || !strings.Contains(st.ClientCertWarning, "expires in 72h") {
		t.Errorf("status subject %q, warning %q; want gw1-soon and a warning that it expires in 72h", st.ClientCertSubject, st.ClientCertWarning)
	}
}

// TestReloadKeepsCertInUse: the certificate in use has expired (or the
// clock is wrong); a reload that does not change it, only something else,
// is not refused for it (every reload was, log level and rules included),
// and a certificate that a reload does change must still be valid now.
// PrepareReload says the same without changing anything.
func TestReloadKeepsCertInUse(t *testing.T) {
	fb := startFakeBroker(t)
	cfg := fb.config(t)
	now := time.Now()
	cfg.CertFile, cfg.KeyFile = clientValid(t, fb.ca, "gw1-expired", now.Add(-48*time.Hour), now.Add(-time.Hour))
	l := startLink(t, cfg, t.TempDir())

	same := cfg
	same.KeepAlive = 45 * time.Second
	same.Forward = append(same.Forward, Rule{Topic: "devices/+/t/secret", Action: ActionLocal})
	if _, err := l.up.PrepareReload(same); err != nil {
		t.Errorf("PrepareReload with the certificate in use, expired: %v; want no refusal", err)
	}
	if got := l.up.cur.Load().cfg; got.KeepAlive == 45*time.Second {
		t.Errorf("PrepareReload applied the new keepalive; it must change nothing")
	}
	if err := l.up.Reload(same); err != nil {
		t.Fatalf("Reload with the certificate in use, expired, and other changes: %v; want them applied", err)
	}
	if got := l.up.cur.Load().cfg; got.KeepAlive != 45*time.Second || len(got.Forward) != 2 {
		t.Errorf("after the reload: keepalive %v, %d rules; want 45s and 2", got.KeepAlive, len(got.Forward))
	}
	if st := l.up.Status(); st.ClientCertSubject != "CN=gw1-expired" || !strings.Contains(st.ClientCertWarning, "expired at") {
		t.Errorf("status subject %q, warning %q; want the expired certificate still in use, and said so", st.ClientCertSubject, st.ClientCertWarning)
	}

	other := same
	other.CertFile, other.KeyFile = clientValid(t, fb.ca, "gw1-other", now.Add(-48*time.Hour), now.Add(-time.Hour))
	for name, f := range map[string]func(Config) error{
		"PrepareReload": func(c Config) error { _, err := l.up.PrepareReload(c); return err },
		"Reload":        l.up.Reload,
	} {
		if err := f(other); err == nil || !strings.Contains(err.Error(), "upstream.cert_file "+other.CertFile) || !strings.Contains(err.Error(), "expired at") {
			t.Errorf("%s with a new, expired certificate: %v; want a refusal naming upstream.cert_file", name, err)
		}
	}
	if st := l.up.Status(); st.ClientCertSubject != "CN=gw1-expired" {
		t.Errorf("status subject %q after the refusals, want the one in use", st.ClientCertSubject)
	}
}

// TestShutdownWithDeafBroker: the broker accepts the link and then reads
// nothing more. The link's write of its backlog blocks (the buffers are
// full); stopping the link must not wait for it: before writes had a
// deadline, the blocked write held the connection's lock, autopaho's
// DISCONNECT waited behind it, and shutdown took until paho's missing
// PINGRESP ended the connection (about two keepalives: up to 36 h).
func TestShutdownWithDeafBroker(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) { b.deaf = true })
	dir := t.TempDir()
	queueBefore(t, dir, deafBacklog()...)
	cfg := fb.config(t)
	cfg.KeepAlive = time.Minute // the write deadline is then 30 s: shutdown must not wait for it either
	l := startLink(t, cfg, dir)
	fb.next(t)
	waitFor(t, "connected", 10*time.Second, func() bool { return l.up.Status().Connected })
	time.Sleep(500 * time.Millisecond) // the backlog's write fills the buffers and blocks
	start := time.Now()
	stopped := make(chan struct{})
	go func() {
		l.stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Errorf("the link did not stop within 10s of its shutdown with a broker that reads nothing")
		<-stopped // l.stop may not run twice at once (the cleanup's)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the link took %v to stop, want a few seconds at most", d)
	}
}

// deafBacklog is 8 MiB of messages: more than the kernel buffers between
// the link and a broker that reads nothing hold (4 MiB send buffer, 4 KiB
// receive buffer), so the link's write of them blocks.
func deafBacklog() []bridges.Message {
	pad := strings.Repeat("x", 200<<10)
	var ms []bridges.Message
	for i := range 40 {
		m := telemetry("d1", i)
		m.Payload = []byte(`{"pad":"` + pad + `"}`)
		ms = append(ms, m)
	}
	return ms
}

// TestWriteDeadlineEndsConnection: the broker stops reading, with a
// keepalive of an hour. The link's write times out (write deadline 1 s
// here; keepalive-derived, at most 30 s, in production) and the connection
// ends: the link reconnects. crypto/tls fails every write after a timeout,
// so the connection was useless, but it stayed up: the sender retried on it
// after each pause, Status said connected, and nothing ended it until paho's
// next PINGREQ failed, a keepalive later.
func TestWriteDeadlineEndsConnection(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) { b.deaf = true })
	dir := t.TempDir()
	queueBefore(t, dir, deafBacklog()...)
	cfg := fb.config(t)
	cfg.KeepAlive = time.Hour
	var log logbuf.Buffer
	l := startLinkWith(t, cfg, dir, func(u *Upstream) {
		u.writeTimeout = time.Second
		u.log = slog.New(slog.NewTextHandler(&log, nil))
	})
	fb.next(t)
	start := time.Now()
	select {
	case <-fb.conns:
	case <-time.After(30 * time.Second):
		t.Fatalf("the link did not reconnect within 30s of a write that timed out; status %+v", l.up.Status())
	}
	t.Logf("reconnected %v after the first connection", time.Since(start).Round(time.Millisecond))
	// The connection's error names the write that ended it (Status shows
	// the latest error, which may be the downlink SUBSCRIBE's, lost with it).
	if s := log.String(); !regexp.MustCompile(`lost: the connection closed after a failed write: .*i/o timeout`).MatchString(s) {
		t.Errorf("the log does not say the connection was lost on the write timeout:\n%s", s)
	}
}

// closingBroker is a fake broker that acknowledges every PUBLISH itself and
// closes the connection on one whose topic has more than 7 levels (AWS IoT
// Core's limit is 7 slashes).
func closingBroker(t *testing.T) *fakeBroker {
	return startFakeBroker(t, func(b *fakeBroker) { b.autoAck, b.closeAbove = true, 7 })
}

// queueDeep queues a, then deep (whose upstream topic
// bastion/gw1/deep/t/a/b/c/d has 8 levels), then b and c, before the link
// starts: the first connection sends them together.
func queueDeep(t *testing.T, dir string) bridges.Message {
	t.Helper()
	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	queueBefore(t, dir, telemetry("a", 1), deep, telemetry("b", 2), telemetry("c", 3))
	return deep
}

// expectAcked waits until the broker has acknowledged every topic in want
// (more copies are allowed: delivery is at least once) and nothing else.
func expectAcked(t *testing.T, fb *fakeBroker, l *link, want ...string) {
	t.Helper()
	missing := map[string]bool{}
	for _, w := range want {
		missing[w] = true
	}
	for len(missing) > 0 {
		select {
		case topic := <-fb.acked:
			if !slices.Contains(want, topic) {
				t.Fatalf("the broker acknowledged %s, want only %v", topic, want)
			}
			delete(missing, topic)
		case <-time.After(20 * time.Second):
			t.Fatalf("never acknowledged: %v; status %+v", missing, l.up.Status())
		}
	}
}

// TestParkBeyondTopicLimits: with upstream.max_topic_levels the link parks
// a message whose upstream topic has more levels, without sending it (the
// broker would close the connection on it, on every reconnect), and the
// messages behind it are delivered on the same connection.
func TestParkBeyondTopicLimits(t *testing.T) {
	fb := closingBroker(t)
	dir := t.TempDir()
	deep := queueDeep(t, dir)
	cfg := fb.config(t)
	cfg.MaxTopicLevels = 7
	l := startLink(t, cfg, dir)
	p := startParking(t, l, t.TempDir())
	expectAcked(t, fb, l, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n", "bastion/gw1/c/t/n")
	waitFor(t, "the deep message parked", 10*time.Second, parkedOne(l, p))
	waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if n := fb.closes.Load(); n != 0 {
		t.Errorf("the broker closed %d connections: the deep message was sent", n)
	}
	ps, err := l.up.ListParked(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps.Messages) != 1 || ps.Messages[0].Device != "deep" || ps.Messages[0].Topic != deep.Topic ||
		!strings.Contains(ps.Messages[0].Why, `"bastion/gw1/deep/t/a/b/c/d" has 8 levels, more than upstream.max_topic_levels 7`) {
		t.Fatalf("parked %+v, want the deep message and why", ps.Messages)
	}
	if v := metricLabel(t, l, "bastion_upstream_parked_total", "topic_too_deep"); v != 1 {
		t.Errorf("bastion_upstream_parked_total{reason=topic_too_deep} = %v, want 1", v)
	}

	// By length: bastion/gw1/deep/t/a/b/c/d is 26 bytes.
	l.stop()
	fb2 := closingBroker(t)
	dir = t.TempDir()
	queueDeep(t, dir)
	cfg = fb2.config(t)
	cfg.MaxTopicLength = 20
	l = startLink(t, cfg, dir)
	p = startParking(t, l, t.TempDir())
	expectAcked(t, fb2, l, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n", "bastion/gw1/c/t/n")
	waitFor(t, "the long message parked", 10*time.Second, parkedOne(l, p))
	if st := l.up.Status(); !strings.Contains(st.LastParked, "is 26 bytes, more than upstream.max_topic_length 20") {
		t.Errorf("LastParked %q, want the length and the limit", st.LastParked)
	}
}

// TestParkManyBeyondTopicLimits: one device sends 40 messages in a row
// whose topics are beyond upstream.max_topic_levels, then another device
// one good message. The link's own verdict on a topic is not a broker's
// refusal: it used to take from the refusals' burst (16, then one a
// minute, refilled only by an accepted message), so the 17th could not be
// parked, stayed at the head, and every device's messages behind it waited a
// minute per bad message. All 40 are parked and the good message arrives
// at once.
func TestParkManyBeyondTopicLimits(t *testing.T) {
	fb := closingBroker(t)
	dir := t.TempDir()
	var ms []bridges.Message
	for i := range 40 {
		ms = append(ms, bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: fmt.Appendf(nil, `{"i":%d}`, i)})
	}
	queueBefore(t, dir, append(ms, telemetry("good", 1))...)
	cfg := fb.config(t)
	cfg.MaxTopicLevels = 7
	l := startLink(t, cfg, dir)
	p := startParking(t, l, t.TempDir())
	select {
	case topic := <-fb.acked:
		if topic != "bastion/gw1/good/t/n" {
			t.Fatalf("the broker acknowledged %s, want the good message", topic)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the good message did not arrive within 5s behind 40 messages beyond the topic limits; parked %d; status %+v", p.Stats().Depth, l.up.Status())
	}
	waitFor(t, "all 40 parked", 10*time.Second, func() bool { return p.Stats().Depth == 40 })
	if n := fb.closes.Load(); n != 0 {
		t.Errorf("the broker closed %d connections: a deep message was sent", n)
	}
}

// TestParkingFullStallsOnlyItsDevice: the parking queue fills up with one
// device's messages beyond the topic limits. The one that does not fit
// stays queued (QoS 1: never dropped), and so do that device's later
// messages (order per device), while another device's messages flow; the
// error says what to do. Each drop of the parked messages makes room, the
// link parks more at once, and once the last is parked the device's good
// message follows.
func TestParkingFullStallsOnlyItsDevice(t *testing.T) {
	fb := closingBroker(t)
	dir := t.TempDir()
	const bad = 10
	var ms []bridges.Message
	for i := range bad {
		ms = append(ms, bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: fmt.Appendf(nil, `{"i":%d,"pad":%q}`, i, strings.Repeat("x", 1500))})
	}
	queueBefore(t, dir, append(ms, telemetry("deep", 1), telemetry("good", 1))...)
	cfg := fb.config(t)
	cfg.MaxTopicLevels = 7
	cfg.BackoffMax = time.Hour // no retry on the timer: room comes from the drops
	l := startLinkWith(t, cfg, dir, func(u *Upstream) {
		p, err := queue.Open(t.TempDir(), queue.Options{MaxBytes: 6 << 10, SegmentBytes: 2 << 10}, testLog(), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		u.SetParking(p)
	})
	p := l.up.parking.Load()
	expectAcked(t, fb, l, "bastion/gw1/good/t/n")
	waitFor(t, "the parking queue full", 10*time.Second, func() bool {
		return strings.Contains(l.up.Status().LastError, "the parking queue did not take it")
	})
	parked := p.Stats().Depth
	if parked == 0 || parked >= bad {
		t.Fatalf("parked %d, want some but not all %d (a small parking queue)", parked, bad)
	}
	if st := l.up.Status(); !strings.Contains(st.LastError, "deep's later messages wait behind it (order per device) while other devices' messages flow") ||
		!strings.Contains(st.LastError, "retry or drop") {
		t.Errorf("LastError %q, want what waits and what to do", st.LastError)
	}
	waitFor(t, fmt.Sprintf("queue depth %d: the %d not parked and deep's good message", bad-parked+1, bad-parked), 10*time.Second, func() bool {
		return l.q.Stats().Depth == bad-parked+1
	})
	select {
	case topic := <-fb.acked:
		t.Fatalf("the broker acknowledged %s while deep's messages before it could not be parked", topic)
	default:
	}
	total := 0
	for range bad {
		n, err := l.up.DropParked(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if total == bad {
			break
		}
		waitFor(t, "more parked after the drop", 10*time.Second, func() bool { return p.Stats().Depth > 0 })
	}
	if total != bad {
		t.Fatalf("dropped %d parked messages in all, want %d", total, bad)
	}
	expectAcked(t, fb, l, "bastion/gw1/deep/t/n")
	if n := fb.closes.Load(); n != 0 {
		t.Errorf("the broker closed %d connections: a deep message was sent", n)
	}
}

// TestParkWhatClosesTheConnection: a broker closes the connection (no
// PUBACK) on a message whose topic is beyond its limits, and the link knows
// no limit. Resent from the queue's head on every reconnect, the message
// used to hold back every message behind it for ever. The link finds it
// (slow start after the first close, then the same message alone three
// times in a row), parks it, and the rest is delivered. Then the link
// pipelines again: the broker answers the later messages only once five
// of them await their PUBACK, which a link still in slow start (one
// PUBLISH in flight, then one more per PUBACK) never gets to.
func TestParkWhatClosesTheConnection(t *testing.T) {
	var batch atomic.Bool
	fb := startFakeBroker(t, func(b *fakeBroker) {
		b.autoAck, b.closeAbove = true, 7
		b.script = func(c *fakeConn, p *packets.Publish) fakeAnswer {
			return fakeAnswer{hold: batch.Load() && len(c.held) < 4}
		}
	})
	dir := t.TempDir()
	deep := queueDeep(t, dir)
	l := startLink(t, fb.config(t), dir)
	p := startParking(t, l, t.TempDir())
	expectAcked(t, fb, l, "bastion/gw1/a/t/n", "bastion/gw1/b/t/n", "bastion/gw1/c/t/n")
	waitFor(t, "the deep message parked", 20*time.Second, parkedOne(l, p))
	waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if n := fb.closes.Load(); n < poisonStrikes || n > poisonStrikes+3 {
		t.Errorf("the broker closed %d connections on the deep message, want %d to %d", n, poisonStrikes, poisonStrikes+3)
	}
	ps, err := l.up.ListParked(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps.Messages) != 1 || ps.Messages[0].Device != "deep" || ps.Messages[0].Topic != deep.Topic ||
		!strings.Contains(ps.Messages[0].Why, "the broker closed the connection 3 times in a row within 10s of receiving it, without a PUBACK") {
		t.Fatalf("parked %+v, want the deep message and why", ps.Messages)
	}
	if v := metricLabel(t, l, "bastion_upstream_parked_total", "connection_closed"); v != 1 {
		t.Errorf("bastion_upstream_parked_total{reason=connection_closed} = %v, want 1", v)
	}
	closes := fb.closes.Load()
	// Then the link pipelines again: 20 more, answered five at a time.
	batch.Store(true)
	for i := range 20 {
		if err := l.up.Accept(context.Background(), telemetry("e", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 20; {
		select {
		case topic := <-fb.acked:
			switch topic {
			case "bastion/gw1/e/t/n":
				i++
			case "bastion/gw1/a/t/n", "bastion/gw1/b/t/n", "bastion/gw1/c/t/n": // another copy of an earlier one
			default:
				t.Fatalf("acknowledged %s", topic)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of the 20 later messages acknowledged: the broker answers them only once five await their PUBACK, so the link is not pipelining again after the park; status %+v", i, l.up.Status())
		}
	}
	if n := fb.closes.Load(); n != closes {
		t.Errorf("the broker closed %d more connections after the park", n-closes)
	}
}

// metricLabel is metric name's value for the series with a label of value v.
func metricLabel(t testing.TB, l *link, name, v string) float64 {
	t.Helper()
	mfs, err := l.reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == v {
					return m.GetCounter().GetValue() + m.GetGauge().GetValue()
				}
			}
		}
	}
	return 0
}

// TestPreparedReloadInstallsWhatWasRead: Apply installs the files as
// PrepareReload read them, even if they change in between, so the gateway's
// check-then-apply cannot fail halfway (with its firewall already changed).
func TestPreparedReloadInstallsWhatWasRead(t *testing.T) {
	fb := startFakeBroker(t)
	cfg := fb.config(t)
	l := startLink(t, cfg, t.TempDir())

	now := time.Now()
	next := cfg
	next.CertFile, next.KeyFile = clientValid(t, fb.ca, "gw1-next", now.Add(-time.Hour), now.Add(48*time.Hour))
	r, err := l.up.PrepareReload(next)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(next.CertFile, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	r.Apply()
	if st := l.up.Status(); st.ClientCertSubject != "CN=gw1-next" {
		t.Errorf("status subject %q after Apply, want the certificate PrepareReload read", st.ClientCertSubject)
	}
}

// holdLog passes records on to Handler, except that it holds the first one
// whose message starts with prefix (closing hit when it comes) until
// release is closed: a test acts inside the window that log line is in.
type holdLog struct {
	slog.Handler
	prefix       string
	once         *sync.Once
	hit, release chan struct{}
}

func newHoldLog(prefix string) holdLog {
	return holdLog{Handler: testLog().Handler(), prefix: prefix, once: new(sync.Once), hit: make(chan struct{}), release: make(chan struct{})}
}

// Enabled is true: the records it holds must reach Handle, whatever
// testLog passes on.
func (holdLog) Enabled(context.Context, slog.Level) bool { return true }

func (h holdLog) Handle(ctx context.Context, r slog.Record) error {
	if strings.HasPrefix(r.Message, h.prefix) {
		h.once.Do(func() {
			close(h.hit)
			<-h.release
		})
	}
	if !h.Handler.Enabled(ctx, r.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h holdLog) WithAttrs(as []slog.Attr) slog.Handler {
	h.Handler = h.Handler.WithAttrs(as)
	return h
}

func (h holdLog) WithGroup(name string) slog.Handler {
	h.Handler = h.Handler.WithGroup(name)
	return h
}

// fullParking is a small parking queue filled with copies of m until it
// refuses one: m does not fit.
func fullParking(t *testing.T, m bridges.Message) *queue.Queue {
	t.Helper()
	p, err := queue.Open(t.TempDir(), queue.Options{MaxBytes: 6 << 10, SegmentBytes: 2 << 10}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	m.Device = "filler"
	for {
		err := p.Accept(context.Background(), m)
		if errors.Is(err, bridges.ErrQueueFull) {
			return p
		}
		if err != nil {
			t.Fatalf("fill the parking queue: %v", err)
		}
	}
}

// TestDropParkedWakesAStallInProgress: the parking queue is full when the
// link parks a message beyond its topic limits, and the operator drops the
// parked messages after the parking queue refused it but before the sender
// recorded the stall (the log line in between holds the sender there).
// DropParked's wake-up found no stalled run, and the device's messages
// waited for the retry timer (backoff_max: an hour here). The sender now
// sees, when it records the stall, that room came meanwhile, and starts
// again at once: the message is parked and the device's next one sent.
func TestDropParkedWakesAStallInProgress(t *testing.T) {
	fb := closingBroker(t)
	dir := t.TempDir()
	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: fmt.Appendf(nil, `{"pad":%q}`, strings.Repeat("x", 1500))}
	queueBefore(t, dir, deep, telemetry("deep", 1))
	cfg := fb.config(t)
	cfg.MaxTopicLevels = 7
	cfg.BackoffMax = time.Hour // no retry on the timer: room comes from the drop
	p := fullParking(t, deep)
	h := newHoldLog("upstream: a refused message cannot be parked")
	l := startLinkWith(t, cfg, dir, func(u *Upstream) {
		u.SetParking(p)
		u.log = slog.New(h).With("component", "upstream")
	})
	var released sync.Once
	release := func() { released.Do(func() { close(h.release) }) }
	t.Cleanup(release) // before l.stop: a sender held in the log would hold it up
	select {
	case <-h.hit:
	case <-time.After(10 * time.Second):
		t.Fatalf("the link did not try to park the deep message; status %+v", l.up.Status())
	}
	n, err := l.up.DropParked(context.Background())
	if err != nil || n == 0 {
		t.Fatalf("DropParked = %d, %v; want the fillers dropped", n, err)
	}
	release()
	select {
	case topic := <-fb.acked:
		if topic != "bastion/gw1/deep/t/n" {
			t.Fatalf("the broker acknowledged %s, want deep's next message", topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("deep's next message was not sent within 10s of the drop (the retry timer is an hour); parked %d; status %+v", p.Stats().Depth, l.up.Status())
	}
	if d := p.Stats().Depth; d != 1 {
		t.Errorf("parked %d, want the deep message alone", d)
	}
}

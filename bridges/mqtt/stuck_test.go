package mqtt

import (
	"bytes"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/pki"
)

// stuckDevice is a device that stopped reading while the gateway has more
// to send it than the TCP buffers hold, and that keeps sending QoS 0
// PUBLISHes: the gateway's write to it is blocked, and every packet it
// reads moves mochi's keepalive deadline (which was the write's too) on.
type stuckDevice struct {
	*device
	pc   *pipeConn
	stop chan struct{}
	done chan struct{}
	err  error // why the flood ended (after done)
}

// dialStuck connects id (MQTT 5, keepalive 300 s, a small receive
// buffer), lets a write to it block and starts its QoS 0 flood. It fails
// the test unless the write blocks and the session still takes the
// device's messages meanwhile.
func dialStuck(t *testing.T, r *rig, id string) *stuckDevice {
	t.Helper()
	d := r.dialTLS(t, id, 5, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 300, ClientIdentifier: id}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("CONNACK: got type %d reason 0x%02x", pk.FixedHeader.Type, pk.ReasonCode)
	}
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: bridges.TopicPrefix(id) + "c/#"}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("got packet type %d, want SUBACK", pk.FixedHeader.Type)
	}
	pc := r.conn(t, id)
	// A small send buffer on the gateway's side too, so that 64 KiB of
	// commands are sure to fill both ends (test only: it changes how much
	// fits, not what happens when it does not).
	if err := pc.Conn.NetConn().(interface{ SetWriteBuffer(int) error }).SetWriteBuffer(4096); err != nil {
		t.Fatal(err)
	}
	// 64 commands of 1 KiB: fewer than mochi's outbound queue holds
	// (writesPending), so none is dropped and the writer has 64 KiB to
	// write into about 16 KiB of buffers.
	payload := bytes.Repeat([]byte("c"), 1024)
	for range 64 {
		if err := r.s.mq.Publish(bridges.TopicPrefix(id)+"c/cmd", payload, false, 0); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a write to the device to block", func() bool { return writeBlocked(pc) })

	s := &stuckDevice{device: d, pc: pc, stop: make(chan struct{}), done: make(chan struct{})}
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5,
		TopicName: bridges.TopicPrefix(id) + "t/flood", Payload: []byte("x")}
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			d.c.SetWriteDeadline(time.Now().Add(time.Second))
			if _, err := d.c.Write(buf.Bytes()); err != nil {
				s.err = err
				return
			}
		}
	}()
	t.Cleanup(s.halt)
	before := r.telemetry()
	waitFor(t, "the stuck device's QoS 0 messages to be taken", func() bool { return r.telemetry() >= before+3 })
	if !writeBlocked(pc) {
		t.Fatal("the write to the device is no longer blocked")
	}
	return s
}

// halt ends the flood and waits for it (once).
func (s *stuckDevice) halt() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
}

// writeBlocked reports whether something holds pc.mu for 50 ms: a write
// to the device (the direct path and the flusher both write under it).
func writeBlocked(pc *pipeConn) bool {
	for range 10 {
		if pc.mu.TryLock() {
			pc.mu.Unlock()
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// telemetry is how many device messages the hub has taken over MQTT.
func (r *rig) telemetry() float64 {
	return testutil.ToFloat64(r.hub.Metrics().Messages.WithLabelValues(hub.MQTT, "telemetry"))
}

// within runs f and fails the test if it has not returned after d. f is
// left running then (the test's cleanup ends what it waits for).
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s still blocked after %v", what, d)
	}
}

// TestRevokeDoesNotWaitForAStuckDevice: a device that stopped reading
// while it floods QoS 0 messages keeps the gateway's write to it blocked,
// and moved the write's deadline on with every packet. Revoking it must
// neither wait for that write (the revocation callback runs inside
// Devices.Revoke) nor leave the session open: Revoke returns within 2 s,
// the session ends within 1 s, and nothing the device sends after Revoke
// returned is taken.
func TestRevokeDoesNotWaitForAStuckDevice(t *testing.T) {
	id := &slowIdentity{revoked: map[string]bool{}}
	r := newRigWith(t, queue.Options{}, Config{}, func(ca *pki.CA) bridges.Identity {
		id.caIdentity = caIdentity{ca}
		return id
	})
	r.rcvBuf = 4096
	d := dialStuck(t, r, "stuck")

	start := time.Now()
	within(t, 2*time.Second, "the revocation", func() { id.revoke("stuck") })
	taken := r.telemetry()
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
	if el := time.Since(start); el > time.Second {
		t.Errorf("session ended %v after the revocation, want within 1 s", el)
	}
	if r.s.Connected("stuck") {
		t.Error("the revoked device is still connected")
	}
	// What the device sends now ends on a closed connection.
	select {
	case <-d.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the revoked device can still write to its connection 5 s after the revocation")
	}
	if d.err == nil || isTimeout(d.err) {
		t.Errorf("the flood ended with %v, want the connection closed", d.err)
	}
	// At most a message being handled as the revocation came.
	if got := r.telemetry(); got > taken+1 {
		t.Errorf("%v messages taken from the device after the revocation returned", got-taken)
	}
	if got := r.refusals(hub.ReasonRevoked); got != 1 {
		t.Errorf("revoked refusals %v, want 1", got)
	}
}

// TestTakeoverDoesNotWaitForAStuckDevice: the device connects again while
// its old session is stuck as above. The new session takes it over at
// once (CONNACK within 2 s) and the old connection is closed.
func TestTakeoverDoesNotWaitForAStuckDevice(t *testing.T) {
	r := newRig(t, queue.Options{})
	r.rcvBuf = 4096
	old := dialStuck(t, r, "stuck")

	d := r.dialTLS(t, "stuck", 5, true)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "stuck"}})
	pk, err := d.readErr(2 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("new connection: got type %d reason 0x%02x (%v), want CONNACK 0 within 2 s", pk.FixedHeader.Type, pk.ReasonCode, err)
	}
	select {
	case <-old.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the old connection is still open 5 s after the takeover")
	}
	if old.err == nil || isTimeout(old.err) {
		t.Errorf("the old connection's flood ended with %v, want the connection closed", old.err)
	}
	if got := r.s.SessionCount(); got != 1 {
		t.Errorf("%d sessions, want 1", got)
	}
}

// TestShutdownDoesNotWaitForAStuckDevice: the server stops within 2 s
// while a device is stuck as above.
func TestShutdownDoesNotWaitForAStuckDevice(t *testing.T) {
	r := newRig(t, queue.Options{})
	r.rcvBuf = 4096
	dialStuck(t, r, "stuck")
	within(t, 2*time.Second, "the server's shutdown", func() {
		if err := r.stop(); err != nil {
			t.Errorf("mqtt server: %v", err)
		}
	})
}

// TestStuckDeviceWriteTimesOut: a write to a device that does not read is
// bounded by WriteTimeout, which the packets the device keeps sending do
// not move on (mochi's keepalive deadline did): the session is closed.
func TestStuckDeviceWriteTimesOut(t *testing.T) {
	const timeout = 3 * time.Second
	r := newRigWith(t, queue.Options{}, Config{WriteTimeout: timeout}, nil)
	r.rcvBuf = 4096
	d := dialStuck(t, r, "stuck")
	select {
	case <-d.done:
	case <-time.After(timeout + 5*time.Second):
		t.Fatalf("the session of a device that reads nothing is still open %v after its write blocked (write timeout %v)", timeout+5*time.Second, timeout)
	}
	if d.err == nil || isTimeout(d.err) {
		t.Errorf("the flood ended with %v, want the connection closed", d.err)
	}
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
}

// TestWriteDeadlineKeptAheadWhileReading: the write deadline is set when a
// write starts, so once a session has written nothing for WriteTimeout it
// has passed. crypto/tls writes on its own while reading (its answer to a
// TLS 1.3 KeyUpdate that asks for one), outside our writes; with the
// deadline passed that write fails at once and the connection is broken for
// the next PUBACK. Each packet read keeps the deadline ahead while no
// write is under way. The test makes such a write itself (a PINGRESP, on
// the TLS connection directly) after an idle spell and a QoS 0 publish,
// which the gateway reads without answering.
func TestWriteDeadlineKeptAheadWhileReading(t *testing.T) {
	const timeout = 300 * time.Millisecond
	r := newRigWith(t, queue.Options{}, Config{WriteTimeout: timeout}, nil)
	d := r.dial(t, "idle", 5) // the CONNACK arms the write deadline
	pc := r.conn(t, "idle")
	time.Sleep(3 * timeout)
	before := r.metric(t, "bastion_queue_depth")
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "devices/idle/t/n", Payload: []byte("qos 0")})
	waitFor(t, "the QoS 0 publish read and queued", func() bool { return r.metric(t, "bastion_queue_depth") > before })
	// mochi refreshes the read deadline before it waits for the next
	// packet, right after handling this one.
	waitFor(t, "the session waiting for its next packet", func() bool {
		return pc.deadline.Load() > time.Now().Add(time.Minute).UnixNano()
	})
	if _, err := pc.Conn.Write([]byte{packets.Pingresp << 4, 0}); err != nil {
		t.Fatalf("a write crypto/tls makes while reading, %v after the session's last write: %v", 3*timeout, err)
	}
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Pingresp {
		t.Fatalf("device read packet type %d, want the PINGRESP", pk.FixedHeader.Type)
	}
}

// TestSlowSteadyReaderGetsItsCommand: the write deadline bounds a write
// to a device that reads nothing, not a long write to one that reads slowly
// but steadily: a 200 KiB command to a device reading 16 KiB every
// WriteTimeout/2 (the whole command takes several WriteTimeouts) arrives
// whole, and the session stays open.
func TestSlowSteadyReaderGetsItsCommand(t *testing.T) {
	const timeout = 400 * time.Millisecond
	r := newRigWith(t, queue.Options{}, Config{WriteTimeout: timeout}, nil)
	r.rcvBuf = 4096
	d := r.dial(t, "slow", 5)
	pc := r.conn(t, "slow")
	if err := pc.Conn.NetConn().(interface{ SetWriteBuffer(int) error }).SetWriteBuffer(4096); err != nil {
		t.Fatal(err)
	}
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/slow/c/#", Qos: 0}}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Suback {
		t.Fatalf("device read packet type %d, want the SUBACK", pk.FixedHeader.Type)
	}
	payload := bytes.Repeat([]byte("c"), 200<<10)
	if err := r.s.mq.Publish("devices/slow/c/big", payload, false, 0); err != nil {
		t.Fatal(err)
	}
	// Read slowly: at most 16 KiB every timeout/2.
	var got []byte
	buf := make([]byte, 16<<10)
	deadline := time.Now().Add(30 * time.Second)
	for len(got) < len(payload) {
		if time.Now().After(deadline) {
			t.Fatalf("read %d of %d bytes in 30 s", len(got), len(payload))
		}
		time.Sleep(timeout / 2)
		for round := 0; round < len(buf); {
			d.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, err := d.r.Read(buf[:len(buf)-round])
			got, round = append(got, buf[:n]...), round+n
			if isTimeout(err) {
				break
			}
			if err != nil {
				t.Fatalf("after %d bytes of the command: %v (the gateway gave up on a device that was reading)", len(got), err)
			}
		}
	}
	if !bytes.Contains(got, payload[:1024]) || r.s.SessionCount() != 1 {
		t.Fatalf("the command did not arrive whole on an open session (sessions %d)", r.s.SessionCount())
	}
}

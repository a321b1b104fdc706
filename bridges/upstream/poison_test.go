package upstream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
)

// queueBefore puts ms in a queue in dir before the link starts, so that the
// first connection's run reads them all.
func queueBefore(t *testing.T, dir string, ms ...bridges.Message) {
	t.Helper()
	q, err := queue.Open(dir, queue.Options{}, testLog(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if err := q.Accept(context.Background(), m); err != nil {
			t.Fatalf("Accept: %v", err)
		}
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// expectInOrder reads the PUBLISHes the broker accepted until each
// device's messages in want (telemetry payloads) have arrived in order:
// copies may come again and early (delivery is at least once; a device's
// later messages accepted before a retried refusal of an earlier one come
// again after it), but each device's messages must be found in order among
// them.
func expectInOrder(t *testing.T, fb *fakeBroker, l *link, want ...bridges.Message) {
	t.Helper()
	type key struct {
		Dev string `json:"dev"`
		I   int    `json:"i"`
	}
	perDev := map[string][]key{}
	for _, m := range want {
		var k key
		if err := json.Unmarshal(m.Payload, &k); err != nil {
			t.Fatal(err)
		}
		perDev[k.Dev] = append(perDev[k.Dev], k)
	}
	next := map[string]int{} // per device: how many of its messages were found in order
	left := len(want)
	var order []key
	for left > 0 {
		select {
		case p := <-fb.ackedPubs:
			var k key
			if err := json.Unmarshal(p.Payload, &k); err != nil {
				t.Fatalf("payload %q: %v", p.Payload, err)
			}
			order = append(order, k)
			if ks := perDev[k.Dev]; next[k.Dev] < len(ks) && ks[next[k.Dev]] == k {
				next[k.Dev]++
				left--
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("not accepted in order per device within 20s: accepted %v; status %+v", order, l.up.Status())
		}
	}
}

// TestBrokerBusyIsNotTheMessage: an overloaded broker answers the first
// PUBLISH of four connections in a row with DISCONNECT 0x89 (server busy),
// then behaves. The message was alone unanswered at three of those ends
// (slow start after the first), which used to park it as connection_closed:
// out of order for its device, and back only through `parked retry` with a
// new bastion-seq. A DISCONNECT about the broker says nothing about the
// message: nothing is parked, every device's messages arrive in order.
func TestBrokerBusyIsNotTheMessage(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) {
		b.autoAck = true
		b.ackedPubs = make(chan *packets.Publish, 1024)
		b.script = func(c *fakeConn, p *packets.Publish) fakeAnswer {
			if c.index <= poisonStrikes+1 && len(c.seen) == 1 {
				return fakeAnswer{disconnect: true, reason: 0x89}
			}
			return fakeAnswer{}
		}
	})
	dir := t.TempDir()
	ms := []bridges.Message{telemetry("d1", 0), telemetry("d2", 0), telemetry("d1", 1), telemetry("d2", 1), telemetry("d1", 2)}
	queueBefore(t, dir, ms...)
	l := startLink(t, fb.config(t), dir)
	p := startParking(t, l, t.TempDir())
	expectInOrder(t, fb, l, ms...)
	if n := fb.disconnects.Load(); n != poisonStrikes+1 {
		t.Errorf("the broker sent %d DISCONNECTs, want %d", n, poisonStrikes+1)
	}
	waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
	if d := p.Stats().Depth; d != 0 {
		ps, _ := l.up.ListParked(context.Background(), 10)
		t.Errorf("parked %d (%+v), want none: DISCONNECT 0x89 is about the broker, not the message", d, ps.Messages)
	}
	if st := l.up.Status(); !strings.Contains(st.LastErrorBeforeConnect+st.LastError, "DISCONNECT with reason 0x89") {
		t.Errorf("status %+v, want the broker's DISCONNECT 0x89 reported", st)
	}
}

// TestAnsweredThenClosedIsNotTheMessage: on each of four connections the
// broker refuses the first message with PUBACK 0x97 (quota exceeded:
// retried), and ends the connection when the link sends it again after the
// pause, without a PUBACK: with DISCONNECT 0x97, or by closing it. The
// message was alone unanswered at those ends, but the broker answered it
// on that same connection: it takes the message, and what ends the
// connection is something else. Nothing is parked; order holds.
func TestAnsweredThenClosedIsNotTheMessage(t *testing.T) {
	for name, end := range map[string]fakeAnswer{
		"DISCONNECT 0x97": {disconnect: true, reason: 0x97},
		"closed":          {close: true},
	} {
		t.Run(name, func(t *testing.T) {
			var first atomic.Uint64
			fb := startFakeBroker(t, func(b *fakeBroker) {
				b.autoAck = true
				b.ackedPubs = make(chan *packets.Publish, 1024)
				b.script = func(c *fakeConn, p *packets.Publish) fakeAnswer {
					seq := seqOf(t, p)
					// The first PUBLISH of the first connection: the queue's head.
					first.CompareAndSwap(0, seq)
					switch {
					case c.index > poisonStrikes+1 || seq != first.Load():
						return fakeAnswer{}
					case c.seen[seq] == 1:
						return fakeAnswer{puback: 0x97}
					}
					return end
				}
			})
			dir := t.TempDir()
			ms := []bridges.Message{telemetry("d1", 0), telemetry("d2", 0), telemetry("d1", 1), telemetry("d2", 1), telemetry("d1", 2)}
			queueBefore(t, dir, ms...)
			l := startLink(t, fb.config(t), dir)
			p := startParking(t, l, t.TempDir())
			expectInOrder(t, fb, l, ms...)
			waitFor(t, "the queue emptied", 10*time.Second, func() bool { return l.q.Stats().Depth == 0 })
			if n := fb.connects.Load(); n < poisonStrikes+2 {
				t.Errorf("%d connections, want at least %d (the script ends %d)", n, poisonStrikes+2, poisonStrikes+1)
			}
			if d := p.Stats().Depth; d != 0 {
				ps, _ := l.up.ListParked(context.Background(), 10)
				t.Errorf("parked %d (%+v), want none: the broker answered the message on each of those connections", d, ps.Messages)
			}
		})
	}
}

// TestParkAloneByReceiveMaximum: a broker whose CONNACK Receive Maximum is 1
// closes the connection (no DISCONNECT) on a topic of more than 7 levels.
// Every PUBLISH is then alone in flight, whatever the link's window: the
// message is named by the first such end and parked after three, not one
// connection later (the link counted a message as alone only when its slow
// start window was 1).
func TestParkAloneByReceiveMaximum(t *testing.T) {
	fb := startFakeBroker(t, func(b *fakeBroker) { b.autoAck, b.closeAbove, b.recvMax = true, 7, 1 })
	dir := t.TempDir()
	deep := bridges.Message{Device: "deep", Topic: "devices/deep/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	queueBefore(t, dir, deep, telemetry("b", 1), telemetry("c", 2))
	l := startLink(t, fb.config(t), dir)
	p := startParking(t, l, t.TempDir())
	expectAcked(t, fb, l, "bastion/gw1/b/t/n", "bastion/gw1/c/t/n")
	waitFor(t, "the deep message parked", 20*time.Second, parkedOne(l, p))
	// At least one close per strike. More when the link saw the downlink
	// SUBSCRIBE as unanswered at an end (its SUBACK not yet read), which
	// does not count against the message: that race between paho's
	// SUBSCRIBE and the first PUBLISH made an exact count fail about one
	// run in ten under -race.
	if n := fb.closes.Load(); n < poisonStrikes {
		t.Errorf("the broker closed %d connections on the deep message, want at least %d (alone in flight each time)", n, poisonStrikes)
	}
	if v := metricLabel(t, l, "bastion_upstream_parked_total", "connection_closed"); v != 1 {
		t.Errorf("bastion_upstream_parked_total{reason=connection_closed} = %v, want 1", v)
	}
}

// TestConnEndBlame: which ends count against the message alone in flight.
func TestConnEndBlame(t *testing.T) {
	for _, tc := range []struct {
		name  string
		end   endState
		count bool
	}{
		{"closed by the broker", endState{cause: endBrokerClosed}, true},
		{"DISCONNECT topic name invalid", endState{cause: endDisconnect, reason: 0x90}, true},
		{"DISCONNECT not authorized", endState{cause: endDisconnect, reason: 0x87}, true},
		{"DISCONNECT server busy", endState{cause: endDisconnect, reason: 0x89}, false},
		{"DISCONNECT quota exceeded", endState{cause: endDisconnect, reason: 0x97}, false},
		{"DISCONNECT keepalive timeout", endState{cause: endDisconnect, reason: 0x8D}, false},
		{"ours: no PINGRESP, write deadline", endState{cause: endOurs}, false},
		{"network", endState{cause: endNetwork}, false},
		{"the broker sent a packet beyond the link's limit", endState{cause: endBrokerFault}, false},
		{"unknown", endState{}, false},
		// The broker may have closed on the SUBSCRIBE (EMQX's ACL
		// deny_action disconnect), written before the message (write 5).
		{"not authorized, SUBSCRIBE before", endState{cause: endDisconnect, reason: 0x87, reqPending: true, reqWrite: 4}, false},
		// Written after it: the broker read the message first.
		{"not authorized, SUBSCRIBE after", endState{cause: endDisconnect, reason: 0x87, reqPending: true, reqWrite: 6}, true},
		{"closed, SUBSCRIBE answered", endState{cause: endBrokerClosed, reqWrite: 4}, true},
	} {
		if how, got := tc.end.blame(5); got != tc.count {
			t.Errorf("%s: counts %v (%s), want %v", tc.name, got, how, tc.count)
		}
	}
}

// discardConn takes every write; reads end (the broker closed it).
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error)      { return len(p), nil }
func (discardConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (discardConn) SetWriteDeadline(time.Time) error { return nil }
func (discardConn) Close() error                     { return nil }

// TestConnEndRecords: the connection records how it ended (the broker's
// close, its DISCONNECT, or ours, whichever came first), which write carried
// the last SUBSCRIBE, and whether it was still unanswered.
func TestConnEndRecords(t *testing.T) {
	open := func() (*packetConn, *linkSession) {
		pc := &packetConn{Conn: discardConn{}}
		s := newLinkSession()
		if err := s.ConAckReceived(pc, nil, &packets.Connack{}); err != nil {
			t.Fatal(err)
		}
		return pc, s
	}

	// A PUBLISH batch (write 1), then paho's SUBSCRIBE (write 2), still
	// awaiting its SUBACK when the broker closes the connection.
	pc, s := open()
	pub, err := pc.writePackets(appendPublish(nil, 1, 1, "bastion/gw1/d1/t/n", []byte("{}"), "gw1", 7))
	if err != nil || pub != 1 {
		t.Fatalf("writePackets: write %d, %v; want 1", pub, err)
	}
	sub := &packets.Subscribe{Subscriptions: []packets.SubOptions{{Topic: "bastion/gw1/+/c/#", QoS: 1}}, Properties: &packets.Properties{}}
	if err := s.AddToSession(context.Background(), sub, make(chan packets.ControlPacket, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.WriteTo(pc); err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Read(make([]byte, 16)); !errors.Is(err, io.EOF) {
		t.Fatalf("Read: %v, want EOF", err)
	}
	pc.Close() // paho closes it after the failed read: not ours
	s.ConnectionLost(nil)
	st := pc.end.state()
	if st.cause != endBrokerClosed || !st.reqPending || st.reqWrite != 2 {
		t.Fatalf("end %+v, want closed by the broker, a SUBSCRIBE pending, written in write 2", st)
	}
	if _, counts := st.blame(pub); !counts {
		t.Errorf("the PUBLISH written before the pending SUBSCRIBE is not blamed")
	}
	if _, counts := st.blame(3); counts {
		t.Errorf("a PUBLISH written after the pending SUBSCRIBE is blamed")
	}

	// The broker's DISCONNECT comes first, then paho closes.
	pc, s = open()
	s.ConnectionLost(&packets.Disconnect{ReasonCode: 0x89})
	pc.Close()
	if st := pc.end.state(); st.cause != endDisconnect || st.reason != 0x89 || st.reqPending {
		t.Errorf("end %+v, want the broker's DISCONNECT 0x89, nothing pending", st)
	}

	// Ours: paho closes it (no PINGRESP), then its read fails.
	pc, _ = open()
	pc.Close()
	pc.Read(make([]byte, 16))
	if st := pc.end.state(); st.cause != endOurs {
		t.Errorf("end %+v, want ours", st)
	}
}

// A broker that sends DISCONNECT 0x89 and closes can reset the connection
// under a write before paho's reader has read the DISCONNECT: the write's
// guess (the broker closed it without one, which counts against the
// message) gives way to the DISCONNECT read after it (server busy, which
// does not). A read's EOF does not replace the DISCONNECT, nor a
// DISCONNECT anything but a write's guess.
func TestDisconnectReplacesWriteGuess(t *testing.T) {
	e := &connEnd{}
	e.setByWrite(endBrokerClosed, "reset under a write")
	e.disconnected(&packets.Disconnect{ReasonCode: 0x89}, false)
	e.readFailed(io.EOF)
	if st := e.state(); st.cause != endDisconnect || st.reason != 0x89 {
		t.Fatalf("end %v reason %#x (%s), want the DISCONNECT 0x89", st.cause, st.reason, st.detail)
	}
	if _, counts := e.state().blame(1); counts {
		t.Error("a DISCONNECT 0x89 counted against the message")
	}
	e = &connEnd{}
	e.readFailed(io.EOF)
	e.disconnected(&packets.Disconnect{ReasonCode: 0x89}, false)
	if st := e.state(); st.cause != endBrokerClosed {
		t.Fatalf("end %v after a read's EOF, then a DISCONNECT; want the EOF's (first recorded)", st.cause)
	}
}

// TestStrikeNotClearedByALaterAnswer: the first connection answers later
// messages of other devices before the message the broker closes on is
// sent (its device waited behind a message that could not be parked, the
// parking queue being full, until the operator dropped the parked ones).
// That end is a strike against it: the broker never answered that message,
// whatever higher seqs it answered. The link used to take the highest seq
// answered on the connection for an answer to every lower one, and lost the
// strike.
func TestStrikeNotClearedByALaterAnswer(t *testing.T) {
	second := make(chan struct{}) // the poison message reached a second connection
	var once sync.Once
	fb := startFakeBroker(t, func(b *fakeBroker) {
		b.autoAck = true
		b.script = func(c *fakeConn, p *packets.Publish) fakeAnswer {
			if strings.Count(p.Topic, "/") < 7 {
				return fakeAnswer{}
			}
			if c.index > 1 {
				once.Do(func() { close(second) })
			}
			return fakeAnswer{close: true}
		}
	})
	dir := t.TempDir()
	pad := fmt.Appendf(nil, `{"pad":%q}`, strings.Repeat("x", 1500))
	long := bridges.Message{Device: "d", Topic: "devices/d/t/" + strings.Repeat("l", 40), QoS: 1, Payload: pad}
	poison := bridges.Message{Device: "d", Topic: "devices/d/t/a/b/c/d", QoS: 1, Payload: []byte(`{}`)}
	queueBefore(t, dir, long, poison, telemetry("e", 1), telemetry("e", 2), telemetry("e", 3))
	cfg := fb.config(t)
	cfg.MaxTopicLength = 30 // long's upstream topic is beyond it, poison's is not
	cfg.BackoffMax = time.Hour
	p := fullParking(t, long)
	var log logbuf.Buffer
	l := startLinkWith(t, cfg, dir, func(u *Upstream) {
		u.SetParking(p)
		u.log = slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	expectAcked(t, fb, l, "bastion/gw1/e/t/n")
	for range 2 {
		expectAcked(t, fb, l, "bastion/gw1/e/t/n")
	}
	waitFor(t, "d stalled behind the long message", 10*time.Second, func() bool {
		return strings.Contains(l.up.Status().LastError, "d's later messages wait behind it")
	})
	if n, err := l.up.DropParked(context.Background()); err != nil || n == 0 {
		t.Fatalf("DropParked = %d, %v; want the fillers dropped", n, err)
	}
	// The end of the first connection is looked at before the second
	// connection's run sends anything.
	select {
	case <-second:
	case <-time.After(20 * time.Second):
		t.Fatalf("the poison message did not reach a second connection; status %+v", l.up.Status())
	}
	if lines := log.Lines("the broker closed the connection right after a message, without a PUBACK", "device=d", "times_in_a_row=1"); len(lines) != 1 {
		t.Fatalf("after the first connection closed on the poison message: %d strike lines, want 1; log:\n%s", len(lines), log.String())
	}
}

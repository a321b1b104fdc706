package upstream

import (
	"context"
	"errors"
	"io"
	"sync"

	"github.com/eclipse/paho.golang/packets"
	paholog "github.com/eclipse/paho.golang/paho/log"
	"github.com/eclipse/paho.golang/paho/session"
)

// linkSession is the MQTT session state of one link (paho's
// session.SessionManager). Every connection starts clean and the durable
// queue, not the session, is what gets resent, so the session keeps no
// store: it allocates packet identifiers, routes SUBACK/UNSUBACK to paho's
// waiting calls, answers the broker's QoS 1/2 PUBLISHes (downlink), and
// completes the link's own PUBLISHes. Those are written by the link's single
// sender (pipeline) several to a TLS record, and their PUBACKs go straight
// to the queue from paho's receive goroutine: no goroutine, timer or context
// per message, which paho's blocking Publish would need.
type linkSession struct {
	mu      sync.Mutex
	conn    io.Writer // nil while disconnected
	gen     uint64    // counts connections: a sender bound to an old one writes nothing to a new one
	recvMax int       // the broker's Receive Maximum
	maxQoS  byte
	maxPkt  int // the broker's Maximum Packet Size (0: no limit)
	lastID  uint16
	client  map[uint16]clientPacket // identifiers in use by our packets
	pubs    int                     // PUBLISHes in client awaiting PUBACK
	server  map[uint16]bool         // QoS 2 PUBLISHes from the broker awaiting PUBREL
	room    chan struct{}           // a PUBACK freed a slot (capacity 1)
	seqs    []uint64                // pubacks' scratch (paho's reading goroutine only)
	errs    paholog.Logger
}

// clientPacket is one of our packets awaiting its answer: a SUBSCRIBE or
// UNSUBSCRIBE (resp, paho waits on it) or a PUBLISH of the pipeline run r
// (queue sequence seq, from device dev: a refusal holds back the PUBACKs of
// that device's later messages, see sendRun.hold).
type clientPacket struct {
	resp chan<- packets.ControlPacket
	r    *sendRun
	seq  uint64
	dev  string
}

// errNoConnection: the connection the sender was bound to is gone.
var errNoConnection = errors.New("upstream connection lost")

var _ session.SessionManager = (*linkSession)(nil)

func newLinkSession() *linkSession {
	return &linkSession{client: map[uint16]clientPacket{}, server: map[uint16]bool{}, room: make(chan struct{}, 1), maxQoS: 2}
}

// ConAckReceived starts a connection. The session is always new (clean
// start, expiry 0): whatever was in flight on the last one is forgotten (the
// queue still holds it).
func (s *linkSession) ConAckReceived(conn io.Writer, _ *packets.Connect, ca *packets.Connack) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reset()
	s.conn = conn
	if pc, ok := conn.(*packetConn); ok {
		pc.sink.Store(&pubackSink{s: s, gen: s.gen})
	}
	s.recvMax, s.maxQoS, s.maxPkt = 65535, 2, 0
	if ca.Properties != nil && ca.Properties.MaximumPacketSize != nil {
		s.maxPkt = int(*ca.Properties.MaximumPacketSize)
	}
	if ca.Properties != nil && ca.Properties.ReceiveMaximum != nil {
		s.recvMax = int(*ca.Properties.ReceiveMaximum)
	}
	if ca.Properties != nil && ca.Properties.MaximumQOS != nil {
		s.maxQoS = *ca.Properties.MaximumQOS
	}
	return nil
}

// ConnectionLost ends the connection; paho's waiting SUBSCRIBE/UNSUBSCRIBE
// calls get the empty packet that means "connection lost". paho calls it
// with the broker's DISCONNECT (on its reading goroutine, before it closes
// the connection) or with nil; the connection records which, and whether a
// SUBSCRIBE was still unanswered (poisonWatch, poison.go).
func (s *linkSession) ConnectionLost(pd *packets.Disconnect) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if pc, ok := s.conn.(*packetConn); ok {
		pending := false
		for _, cp := range s.client {
			pending = pending || cp.resp != nil
		}
		pc.end.disconnected(pd, pending)
	}
	s.reset()
	return nil
}

// reset forgets the connection. Caller holds s.mu.
func (s *linkSession) reset() {
	for _, cp := range s.client {
		if cp.resp != nil {
			select {
			case cp.resp <- packets.ControlPacket{}:
			default:
			}
		}
	}
	clear(s.client)
	clear(s.server)
	s.pubs = 0
	s.conn = nil
	s.gen++
}

// connection returns the current connection's generation (0: none), the
// highest QoS and the largest packet the broker accepts (0: no limit).
func (s *linkSession) connection() (gen uint64, maxQoS byte, maxPacket int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return 0, 0, 0
	}
	return s.gen, s.maxQoS, s.maxPkt
}

// nextID allocates a free packet identifier. Caller holds s.mu.
func (s *linkSession) nextID(cp clientPacket) (uint16, error) {
	for range 65535 {
		s.lastID++
		if s.lastID == 0 {
			s.lastID = 1
		}
		if _, used := s.client[s.lastID]; !used {
			s.client[s.lastID] = cp
			return s.lastID, nil
		}
	}
	return 0, session.ErrPacketIdentifiersExhausted
}

// AddToSession is paho's path for SUBSCRIBE and UNSUBSCRIBE. The link's
// PUBLISHes go through addPublish; paho's own Publish (QoS > 0) is refused
// because nothing would ack its message in the queue.
func (s *linkSession) AddToSession(_ context.Context, p session.Packet, resp chan<- packets.ControlPacket) error {
	if p.Type() == packets.PUBLISH {
		return errors.New("upstream session: QoS 1/2 PUBLISH is sent by the link's pipeline, not paho's Publish")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return session.ErrNoConnection
	}
	id, err := s.nextID(clientPacket{resp: resp})
	if err != nil {
		return err
	}
	p.SetIdentifier(id)
	return nil
}

// addPublish reserves an identifier for PUBLISH seq (from device dev) of
// run r on connection gen. full: window (or the broker's Receive Maximum)
// publishes await their PUBACK; wait on s.room and try again. inFlight is
// how many await their PUBACK with this one: 1 when it is alone.
func (s *linkSession) addPublish(gen uint64, window int, r *sendRun, seq uint64, dev string) (id uint16, inFlight int, full bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil || s.gen != gen {
		return 0, 0, false, errNoConnection
	}
	if s.pubs >= min(window, s.recvMax) {
		return 0, s.pubs, true, nil
	}
	id, err = s.nextID(clientPacket{r: r, seq: seq, dev: dev})
	if err != nil {
		return 0, s.pubs, false, err
	}
	s.pubs++
	return id, s.pubs, false, nil
}

// connEnd is how connection gen ends (nil: gone already, or not a
// packetConn).
func (s *linkSession) connEnd(gen uint64) *connEnd {
	s.mu.Lock()
	defer s.mu.Unlock()
	if pc, ok := s.conn.(*packetConn); ok && s.gen == gen {
		return &pc.end
	}
	return nil
}

// write sends b (whole packets) on connection gen, in one write, and
// returns that write's number on the connection (0: not a packetConn).
func (s *linkSession) write(gen uint64, b []byte) (uint64, error) {
	s.mu.Lock()
	conn := s.conn
	if s.gen != gen {
		conn = nil
	}
	s.mu.Unlock()
	if conn == nil {
		return 0, errNoConnection
	}
	if pc, ok := conn.(*packetConn); ok {
		return pc.writePackets(b)
	}
	_, err := conn.Write(b)
	return 0, err
}

// PacketReceived handles every packet with an identifier. It runs on
// paho's receive goroutine, in the order the broker sent them.
func (s *linkSession) PacketReceived(recv *packets.ControlPacket, pubChan chan<- *packets.Publish) error {
	switch p := recv.Content.(type) {
	case *packets.Puback:
		s.mu.Lock()
		cp, ok := s.client[p.PacketID]
		if ok && cp.r != nil {
			delete(s.client, p.PacketID)
			s.pubs--
		}
		s.mu.Unlock()
		if ok && cp.r != nil {
			select {
			case s.room <- struct{}{}:
			default:
			}
			cp.r.answered(cp.seq)
			cp.r.puback(cp.seq, cp.dev, p.ReasonCode)
		}
		return nil
	case *packets.Suback:
		s.endClient(p.PacketID, recv)
		return nil
	case *packets.Unsuback:
		s.endClient(p.PacketID, recv)
		return nil
	case *packets.Pubrec: // we send no QoS 2: "Packet Identifier not found"
		return s.send(&packets.Pubrel{PacketID: p.PacketID, ReasonCode: 0x92})
	case *packets.Pubcomp:
		return nil
	case *packets.Pubrel:
		s.mu.Lock()
		delete(s.server, p.PacketID)
		s.mu.Unlock()
		return s.send(&packets.Pubcomp{PacketID: p.PacketID})
	case *packets.Publish:
		if p.QoS == 0 {
			pubChan <- p
			return nil
		}
		if p.PacketID == 0 {
			return errors.New("upstream session: QoS > 0 PUBLISH without a packet identifier")
		}
		if p.QoS == 2 {
			s.mu.Lock()
			dup := s.server[p.PacketID]
			s.mu.Unlock()
			if dup { // delivered already, PUBREC lost: answer again
				return s.send(&packets.Pubrec{PacketID: p.PacketID})
			}
		}
		pubChan <- p // answered by Ack once handled
		return nil
	}
	return nil
}

// pubacks completes the PUBACKs packetConn took out of connection gen's
// stream, in the order received: one lock for all of them, and the
// successes of one run acknowledged in the queue together. PUBACKs of a
// connection that is no longer the session's are ignored (the queue still
// holds those messages). A success for a device whose earlier message this
// run saw refused (and kept) is not acknowledged either (sendRun.hold): in
// the same read or a later one.
func (s *linkSession) pubacks(gen uint64, acks []puback) {
	s.mu.Lock()
	if s.gen != gen || s.conn == nil {
		s.mu.Unlock()
		return
	}
	freed := 0
	for i := range acks {
		cp, ok := s.client[acks[i].id]
		if !ok || cp.r == nil {
			continue // not awaiting a PUBACK: ignored, as paho's session would
		}
		delete(s.client, acks[i].id)
		s.pubs--
		freed++
		acks[i].r, acks[i].seq, acks[i].dev = cp.r, cp.seq, cp.dev
	}
	s.mu.Unlock()
	if freed == 0 {
		return
	}
	select {
	case s.room <- struct{}{}:
	default:
	}
	var run *sendRun
	seqs := s.seqs[:0]
	done := func() {
		if len(seqs) > 0 {
			run.acked(seqs)
			seqs = seqs[:0]
		}
	}
	for _, a := range acks {
		if a.r == nil {
			continue
		}
		a.r.answered(a.seq)
		if a.r != run {
			done()
			run = a.r
		}
		if a.reason >= 0x80 {
			done()
			a.r.puback(a.seq, a.dev, a.reason)
			continue
		}
		if a.r.holds(a.dev) {
			a.r.conn.keep(a.seq) // stays queued: resent after the refused one
			continue
		}
		seqs = append(seqs, a.seq)
	}
	done()
	s.seqs = seqs
}

func (s *linkSession) endClient(id uint16, recv *packets.ControlPacket) {
	s.mu.Lock()
	cp, ok := s.client[id]
	if ok && cp.resp != nil {
		delete(s.client, id)
	}
	s.mu.Unlock()
	if ok && cp.resp != nil {
		cp.resp <- *recv // buffered (1) by paho
	}
}

// Ack answers a broker PUBLISH once paho's handlers have run (in the order
// received).
func (s *linkSession) Ack(pb *packets.Publish) error {
	switch pb.QoS {
	case 1:
		return s.send(&packets.Puback{PacketID: pb.PacketID})
	case 2:
		s.mu.Lock()
		s.server[pb.PacketID] = true
		s.mu.Unlock()
		return s.send(&packets.Pubrec{PacketID: pb.PacketID})
	}
	return nil
}

// send writes one answer packet on the current connection.
func (s *linkSession) send(p interface {
	WriteTo(io.Writer) (int64, error)
}) error {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return session.ErrNoConnection
	}
	_, err := p.WriteTo(conn)
	if err != nil && s.errs != nil {
		s.errs.Printf("upstream session: write: %v", err)
	}
	return err
}

func (s *linkSession) Close() error { return nil }

func (s *linkSession) SetErrorLogger(l paholog.Logger) { s.errs = l }

func (s *linkSession) SetDebugLogger(paholog.Logger) {}

// inFlight is how many PUBLISHes of connection gen await their PUBACK.
func (s *linkSession) inFlight(gen uint64) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gen != gen || s.conn == nil {
		return 0
	}
	return s.pubs
}

package upstream

import (
	"net"
	"sync"

	"github.com/eclipse/paho.golang/packets"
)

// turn lets the pipeline start the next publish only once the previous
// PUBLISH is on the wire, so that many publishes can await their PUBACK at
// once while the broker still receives them in queue order.
type turn struct {
	once sync.Once
	ch   chan struct{}
}

func newTurn() *turn { return &turn{ch: make(chan struct{})} }

func (t *turn) release() { t.once.Do(func() { close(t.ch) }) }

// packetConn is the connection paho writes to. paho locks it around each
// packet (it implements sync.Locker, which packets.ControlPacket.WriteTo
// honours) and writes a packet in several pieces; packetConn gathers the
// pieces and sends the packet with one write (one TLS record, one syscall),
// and reports when a PUBLISH has gone out.
type packetConn struct {
	net.Conn
	mu        sync.Mutex
	locked    bool
	first     bool
	publish   bool
	need      int
	buf       []byte
	onPublish func()
}

func (c *packetConn) Lock() {
	c.mu.Lock()
	c.locked, c.first, c.publish, c.buf = true, true, false, c.buf[:0]
}

func (c *packetConn) Unlock() {
	var err error
	if len(c.buf) > 0 { // a packet shorter than its header said: send what we have
		_, err = c.Conn.Write(c.buf)
		c.buf = c.buf[:0]
	}
	pub := c.publish && err == nil
	c.locked = false
	c.mu.Unlock()
	if pub && c.onPublish != nil {
		c.onPublish()
	}
}

func (c *packetConn) Write(b []byte) (int, error) {
	if !c.locked || len(b) == 0 {
		return c.Conn.Write(b)
	}
	if c.first {
		c.first = false
		rem, ok := remainingLength(b)
		if !ok {
			return c.Conn.Write(b)
		}
		c.publish = b[0]>>4 == packets.PUBLISH
		c.need = rem
		c.buf = append(c.buf[:0], b...)
	} else {
		c.buf = append(c.buf, b...)
		c.need -= len(b)
	}
	if c.need <= 0 {
		_, err := c.Conn.Write(c.buf)
		c.buf = c.buf[:0]
		if err != nil {
			return 0, err
		}
	}
	return len(b), nil
}

// remainingLength decodes the fixed header's remaining length if b is
// exactly a fixed header (as paho writes it: one piece).
func remainingLength(b []byte) (int, bool) {
	v, mul := 0, 1
	for i := 1; i < len(b) && i <= 4; i++ {
		v += int(b[i]&0x7f) * mul
		mul *= 128
		if b[i]&0x80 == 0 {
			return v, i == len(b)-1
		}
	}
	return 0, false
}

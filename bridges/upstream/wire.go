package upstream

import (
	"net"
	"sync"
)

// packetConn is the connection paho writes to. paho locks it around each
// packet (it implements sync.Locker, which packets.ControlPacket.WriteTo
// honours) and writes a packet in several pieces; packetConn gathers the
// pieces and sends the packet with one write (one TLS record, one syscall).
// The link's sender writes many whole PUBLISH packets at once with
// writePackets.
type packetConn struct {
	net.Conn
	mu     sync.Mutex
	locked bool
	first  bool
	need   int
	buf    []byte
}

// writePackets writes whole packets in one write, between paho's packets.
func (c *packetConn) writePackets(b []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := c.Conn.Write(b)
	return err
}

func (c *packetConn) Lock() {
	c.mu.Lock()
	c.locked, c.first, c.buf = true, true, c.buf[:0]
}

func (c *packetConn) Unlock() {
	if len(c.buf) > 0 { // a packet shorter than its header said: send what we have
		c.Conn.Write(c.buf) // an error shows on the next write or read
		c.buf = c.buf[:0]
	}
	c.locked = false
	c.mu.Unlock()
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

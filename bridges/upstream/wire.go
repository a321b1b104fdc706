package upstream

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/packets"
)

// packetConn is the connection paho writes to and reads from.
//
// Writes: paho locks it around each packet (it implements sync.Locker,
// which packets.ControlPacket.WriteTo honours) and writes a packet in
// several pieces; packetConn gathers the pieces and sends the packet with
// one write (one TLS record, one syscall). The link's sender writes many
// whole PUBLISH packets at once with writePackets.
//
// Reads: the broker's PUBACKs (one per uplink message) are taken out of the
// stream in Read and completed in the link's session directly, every
// PUBACK of one read from the connection at once; paho reads every other
// packet, byte for byte as the broker sent it. paho's packet reader
// allocates about 2 KB per packet (its bytes.Buffer grows by 512 bytes
// before reading even a 2-byte body) and takes the session lock once per
// PUBACK. A packet larger than the Maximum Packet Size the link announced
// (maxDownlinkPacket), or whose length does not decode, never reaches paho:
// Read fails (refuseRead). paho's reader allocates a packet's whole
// remaining length before reading its body, so a header claiming 256 MiB
// (ff ff ff 7f) would have it allocate 256 MiB, at every reconnect.
//
// Every write has a deadline (writeTimeout, and abortWrites once the link
// is shutting down): a broker that stops reading would otherwise block the
// writer while it holds mu, and with it paho's PINGREQ and the DISCONNECT
// of a shutdown or reload, until paho's missing PINGRESP gave up on the
// connection (about two keepalives: up to 36 hours). A write that fails, on
// its deadline or otherwise, closes the connection (broken).
type packetConn struct {
	net.Conn
	// writeTimeout bounds each write of up to writeChunk bytes (0: none).
	writeTimeout time.Duration
	abortAt      atomic.Int64 // UnixNano: no write lasts past it (0: none)
	stopAbort    func() bool  // unregisters the abort on the dial context
	mu           sync.Mutex
	locked       bool
	first        bool
	need         int
	ptype        byte // the type of the packet paho is writing
	buf          []byte
	// end records how the connection ends and what it carried, for
	// poisonWatch (poison.go); brokenBy is the failed write that closed it.
	end      connEnd
	brokenBy atomic.Pointer[string]

	// The read side; only paho's reading goroutine (its CONNACK reader,
	// then its receive loop) touches it.
	sink atomic.Pointer[pubackSink] // nil until the session has the connection
	rbuf []byte                     // read buffer: in and out are slices of it
	in   []byte                     // read, not yet looked at
	out  []byte                     // for paho
	pass int                        // bytes of the current packet still to go to paho
	acks []puback
	// refused is why the link reads nothing more from the broker (a packet
	// beyond its limit, a malformed header): every Read returns it.
	refused error
}

// pubackSink completes PUBACKs of connection gen of a session.
type pubackSink struct {
	s   *linkSession
	gen uint64
}

// puback is one PUBACK taken out of the stream.
type puback struct {
	id     uint16
	reason byte
	r      *sendRun // filled by the session: the PUBLISH it answers
	seq    uint64
	dev    string
}

// readBufSize is packetConn's read buffer; a PUBACK larger than it (a long
// reason string) goes to paho's reader instead.
const readBufSize = 4096

// Read gives paho every packet but PUBACKs.
func (c *packetConn) Read(p []byte) (int, error) {
	for {
		if len(c.out) > 0 {
			n := copy(p, c.out)
			c.out = c.out[n:]
			return n, nil
		}
		if c.refused != nil {
			return 0, c.refused
		}
		if c.scan() {
			continue
		}
		if c.rbuf == nil {
			c.rbuf = make([]byte, readBufSize)
		}
		// out is empty: move what is left to the front and read more.
		k := copy(c.rbuf, c.in)
		n, err := c.Conn.Read(c.rbuf[k:])
		c.in = c.rbuf[:k+n]
		if n == 0 && err != nil {
			c.end.readFailed(err)
			if why := c.brokenBy.Load(); why != nil {
				// The read failed because a write closed the connection:
				// paho reports this error, and the write's is the reason.
				err = fmt.Errorf("%s: %w", *why, err)
			}
			return 0, err
		}
		// With n > 0 an error, if any, comes again on the next read.
	}
}

// scan moves the next packet's bytes to out, or takes the PUBACKs at the
// head of in and completes them, or refuses the packet at the head of in
// (refuseRead); it reports whether it did anything.
func (c *packetConn) scan() bool {
	if c.pass > 0 {
		if len(c.in) == 0 {
			return false
		}
		k := min(len(c.in), c.pass)
		c.pass -= k
		c.out, c.in = c.in[:k], c.in[k:]
		return true
	}
	sink := c.sink.Load()
	did := false
	for len(c.in) > 0 {
		rem, hl, ok := fixedHeader(c.in)
		if hl < 0 {
			// paho's reader would take any number of length bytes and make
			// up to 4 GiB of them (a negative length, which panics, where
			// int is 32 bits).
			c.refuseRead(readMalformed, fmt.Sprintf("the broker sent a packet (type %d) whose remaining length takes more than 4 bytes: not MQTT", c.in[0]>>4))
			did = true
			break
		}
		if !ok {
			break // the header is not complete yet
		}
		if n := hl + rem; n > maxDownlinkPacket {
			c.refuseRead(readTooLarge, fmt.Sprintf("the broker sent a packet (type %d) of %d bytes, larger than the Maximum Packet Size of %d bytes the link announced in its CONNECT (MQTT v5 §3.1.2.11.4); the link reads no further and reconnects: the broker, or whatever publishes to the downlink topics, must keep commands within it", c.in[0]>>4, n, maxDownlinkPacket))
			did = true
			break
		}
		if c.in[0] == 0x40 && rem >= 2 && sink != nil && hl+rem <= len(c.rbuf) {
			if len(c.in) < hl+rem {
				break
			}
			body := c.in[hl : hl+rem]
			a := puback{id: uint16(body[0])<<8 | uint16(body[1])}
			if rem > 2 {
				a.reason = body[2] // properties (a reason string) are not needed
			}
			c.acks = append(c.acks, a)
			c.in = c.in[hl+rem:]
			did = true
			continue
		}
		c.pass = hl + rem
		k := min(c.pass, len(c.in))
		c.pass -= k
		c.out, c.in = c.in[:k], c.in[k:]
		did = true
		break
	}
	if len(c.acks) > 0 {
		sink.s.pubacks(sink.gen, c.acks)
		clear(c.acks)
		c.acks = c.acks[:0]
	}
	return did
}

// The results a refused read counts in bastion_upstream_downlink_total.
const (
	readTooLarge  = "packet_too_large"
	readMalformed = "malformed_packet"
)

// readRefusal is the error Read returns once the broker sent a packet the
// link does not read (refuseRead). Upstream counts it, by result, where
// paho reports it (countRefusedRead).
type readRefusal struct {
	result string // readTooLarge, readMalformed
	why    string
}

func (e *readRefusal) Error() string { return e.why }

// countRefusedRead counts err in bastion_upstream_downlink_total if it is
// (or wraps) a packet the link refused to read. paho reports a read error
// once per connection (OnClientError, or OnConnectError for the CONNACK's
// read), and the link logs it there (setError): one count and one line per
// connection, whatever the broker sends after.
func (u *Upstream) countRefusedRead(err error) {
	var r *readRefusal
	if errors.As(err, &r) {
		u.m.downlink.WithLabelValues(r.result).Inc()
	}
}

// refuseRead ends reading: this and every later Read fail with why, and
// paho, whose read fails, closes the connection; autopaho reconnects with
// the link's backoff. The end is the broker's (endBrokerFault), not one
// that can be a message's: poisonWatch counts it against none.
func (c *packetConn) refuseRead(result, why string) {
	c.refused = &readRefusal{result: result, why: why}
	c.end.set(endBrokerFault, 0, why)
}

// fixedHeader decodes an MQTT fixed header at the start of b: the
// remaining length and the header's length. ok is false while b ends
// inside the header; hl is -1 for a remaining length longer than 4 bytes.
func fixedHeader(b []byte) (rem, hl int, ok bool) {
	mul := 1
	for i := 1; i < len(b); i++ {
		if i > 4 {
			return 0, -1, false
		}
		rem += int(b[i]&0x7f) * mul
		mul *= 128
		if b[i]&0x80 == 0 {
			return rem, i + 1, true
		}
	}
	if len(b) > 4 {
		return 0, -1, false
	}
	return 0, 0, false
}

// writePackets writes whole packets in one write, between paho's packets,
// and returns that write's number on the connection (connEnd.writes).
func (c *packetConn) writePackets(b []byte) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.write(b)
	return c.end.writes.Load(), err
}

// minWriteTimeout and maxWriteTimeout bound writeTimeout.
const (
	minWriteTimeout = 5 * time.Second
	maxWriteTimeout = 30 * time.Second
)

// writeTimeout is how long one write (of up to writeChunk bytes) may take
// on a link with keepalive k: a broker that takes no bytes for a whole
// keepalive cannot take the PINGREQ either, so by MQTT's own measure the
// connection is dead. Capped, so that a long keepalive (up to 18 h) does
// not hold a reconnect; at least minWriteTimeout, because the kernel wakes
// a blocked writer only once a good part of the send buffer has drained,
// which on a slow uplink takes seconds (and with a short keepalive paho's
// missing PINGRESP ends the connection soon anyway).
func writeTimeout(k time.Duration) time.Duration {
	return min(max(k, minWriteTimeout), maxWriteTimeout)
}

// writeChunk: a longer write is made in pieces, each with its own
// deadline, so the deadline bounds how long the broker takes nothing, not
// how long a large batch takes over a slow uplink.
const writeChunk = 64 << 10

// shutdownGrace is how long writes may still take once the link is
// shutting down or reloading: enough for the DISCONNECT to a broker that
// reads, and a write blocked on one that does not ends.
const shutdownGrace = time.Second

// write writes b under the write deadline; a write that fails ends the
// connection (broken), and the link reconnects (the queue still holds what
// was not acknowledged).
func (c *packetConn) write(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	c.end.writes.Add(1)
	for len(b) > 0 {
		n := min(len(b), writeChunk)
		c.setWriteDeadline()
		if _, err := c.Conn.Write(b[:n]); err != nil {
			c.broken(err)
			return err
		}
		b = b[n:]
	}
	return nil
}

// broken closes the connection after a failed write. Once a write failed,
// its deadline included, crypto/tls fails every later one with the same
// error: the connection carries nothing more. Left open, the link's sender
// retried on it after a pause, again and again, and nothing ended it until
// paho's next PINGREQ failed, a keepalive later (up to 18 h), while Status
// said connected. Closed, paho's reader fails at once and autopaho
// reconnects. The socket under the TLS connection is closed, not the TLS
// connection: its Close would first try to write close_notify, and wait on
// the broker that takes nothing.
func (c *packetConn) broken(err error) {
	why := "the connection closed after a failed write: " + err.Error()
	c.brokenBy.CompareAndSwap(nil, &why)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.end.set(endOurs, 0, "a write to the broker timed out")
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		c.end.setByWrite(endBrokerClosed, "the broker closed the connection without a DISCONNECT (a write found it reset)")
	case errors.Is(err, net.ErrClosed):
		c.end.set(endOurs, 0, "closed by the link")
	default:
		c.end.set(endNetwork, 0, "a network error: "+err.Error())
	}
	if nc, ok := c.Conn.(interface{ NetConn() net.Conn }); ok {
		nc.NetConn().Close()
		return
	}
	c.Conn.Close()
}

func (c *packetConn) setWriteDeadline() {
	var d time.Time
	if c.writeTimeout > 0 {
		d = time.Now().Add(c.writeTimeout)
		c.Conn.SetWriteDeadline(d)
	}
	// Checked after setting: abortWrites sets its deadline after storing
	// it, so whichever runs second leaves the earlier deadline in force.
	if a := c.abortAt.Load(); a != 0 && (d.IsZero() || a < d.UnixNano()) {
		c.Conn.SetWriteDeadline(time.Unix(0, a))
	}
}

// abortWrites bounds every write, the one in progress included, to end
// within grace.
func (c *packetConn) abortWrites(grace time.Duration) {
	at := time.Now().Add(grace)
	c.abortAt.Store(at.UnixNano())
	c.Conn.SetWriteDeadline(at)
}

// Close also unregisters the abort from the dial context. Unless the
// connection had ended already (the broker's DISCONNECT, a failed read or
// write), it is the link ending it: paho's missing PINGRESP, reload or
// shutdown.
func (c *packetConn) Close() error {
	c.end.set(endOurs, 0, "closed by the link (no PINGRESP within the keepalive, reload or shutdown)")
	if c.stopAbort != nil {
		c.stopAbort()
	}
	return c.Conn.Close()
}

func (c *packetConn) Lock() {
	c.mu.Lock()
	c.locked, c.first, c.buf = true, true, c.buf[:0]
}

func (c *packetConn) Unlock() {
	if len(c.buf) > 0 { // a packet shorter than its header said: send what we have
		c.write(c.buf) // an error shows on the next write or read
		c.buf = c.buf[:0]
	}
	c.locked = false
	c.mu.Unlock()
}

func (c *packetConn) Write(b []byte) (int, error) {
	if !c.locked || len(b) == 0 {
		return c.writeN(b)
	}
	if c.first {
		c.first = false
		rem, ok := remainingLength(b)
		if !ok {
			return c.writeN(b)
		}
		c.need = rem
		c.ptype = b[0] >> 4
		c.buf = append(c.buf[:0], b...)
	} else {
		c.buf = append(c.buf, b...)
		c.need -= len(b)
	}
	if c.need <= 0 {
		err := c.write(c.buf)
		c.buf = c.buf[:0]
		if err != nil {
			return 0, err
		}
		if c.ptype == packets.SUBSCRIBE || c.ptype == packets.UNSUBSCRIBE {
			c.end.requestWritten(c.end.writes.Load())
		}
	}
	return len(b), nil
}

func (c *packetConn) writeN(b []byte) (int, error) {
	if err := c.write(b); err != nil {
		return 0, err
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

package powercut

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
)

// benchSub is the benchmark's cloud subscriber: an MQTT v5 client over TLS
// 1.3 with a client certificate that subscribes at QoS 1 and hands each
// PUBLISH's payload to a handler on its read goroutine, PUBACKing every
// message of one read in one write.
//
// Why not paho (mosquitto.Subscribe): paho decodes each string property
// through io.CopyN into a fresh bytes.Buffer (at least 512 B and three
// allocations per string), so the two user properties every bridged
// message of Bastion carries (bastion-origin, bastion-seq) cost the
// benchmark process about 10 µs of CPU and 26 allocations per message,
// which the Mosquitto bridge's messages (no properties) do not. On the
// saturated 2-core box that cost of the stand-in for the cloud counted
// against Bastion's throughput. This subscriber skips the properties as
// the bytes they are, the same way for both paths: what it costs per
// message is the TLS record bytes it reads, which stays as it is.
type benchSub struct {
	conn    *tls.Conn
	handler atomic.Pointer[func(payload []byte)]
	wmu     sync.Mutex // writes: the read loop's PUBACKs and the pinger's PINGREQs
	done    chan struct{}
	err     error // why the read loop ended; read after done
}

// subscribeBench connects to b as client cn and subscribes to filter at
// QoS 1; the test's cleanup disconnects it.
func subscribeBench(tb testing.TB, b *mosquitto.Broker, cn, filter string) *benchSub {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := (&tls.Dialer{Config: b.ClientTLS(b.CA.Client(tb, cn))}).DialContext(ctx, "tcp", b.Addr)
	if err != nil {
		tb.Fatalf("bench subscriber: %v", err)
	}
	conn := c.(*tls.Conn)
	s := &benchSub{conn: conn, done: make(chan struct{})}
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	keepalive, err := s.handshake(r, cn, filter)
	if err != nil {
		conn.Close()
		tb.Fatalf("bench subscriber %s on %s: %v", cn, b.Addr, err)
	}
	conn.SetDeadline(time.Time{})
	var wg sync.WaitGroup
	stopPing := make(chan struct{})
	if keepalive > 0 { // the broker asked for one (Server Keep Alive)
		wg.Go(func() {
			t := time.NewTicker(keepalive / 2)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					s.write([]byte{0xc0, 0})
				case <-stopPing:
					return
				}
			}
		})
	}
	wg.Go(func() {
		defer close(s.done)
		s.err = s.readLoop(r)
	})
	tb.Cleanup(func() {
		s.write([]byte{0xe0, 0}) // DISCONNECT, normal
		close(stopPing)
		conn.Close()
		wg.Wait()
	})
	return s
}

// handshake sends CONNECT (clean start, no keepalive of our own) and
// SUBSCRIBE and reads their answers; it returns the keepalive the broker
// imposes, if any.
func (s *benchSub) handshake(r *bufio.Reader, cn, filter string) (time.Duration, error) {
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 5, 0x02, 0, 0, 0} // v5, clean start, keepalive 0, no properties
	body = appendString(body, cn)
	if err := s.write(appendPacket(nil, 0x10, body)); err != nil {
		return 0, fmt.Errorf("CONNECT: %w", err)
	}
	typ, ack, err := readPacket(r, nil)
	if err != nil || typ>>4 != 2 || len(ack) < 3 || ack[1] != 0 {
		return 0, fmt.Errorf("CONNACK: type 0x%02x %x %v", typ, ack, err)
	}
	var keepalive time.Duration
	props, _, err := splitProps(ack[2:])
	if err != nil {
		return 0, fmt.Errorf("CONNACK properties: %w", err)
	}
	for len(props) > 0 { // only Server Keep Alive matters here; others are skipped by their known sizes
		id := props[0]
		n, ok := propSize(id, props[1:])
		if !ok {
			break
		}
		if id == 0x13 && n == 2 {
			keepalive = time.Duration(binary.BigEndian.Uint16(props[1:])) * time.Second
		}
		props = props[1+n:]
	}
	sub := []byte{0, 1, 0} // packet id 1, no properties
	sub = append(appendString(sub, filter), 0x01)
	if err := s.write(appendPacket(nil, 0x82, sub)); err != nil {
		return 0, fmt.Errorf("SUBSCRIBE: %w", err)
	}
	typ, ack, err = readPacket(r, nil)
	if err != nil || typ>>4 != 9 || len(ack) < 4 || ack[len(ack)-1] != 0x01 {
		return 0, fmt.Errorf("SUBACK for %s at QoS 1: type 0x%02x %x %v", filter, typ, ack, err)
	}
	return keepalive, nil
}

// propSize is the length of a CONNACK property's value that starts at v.
func propSize(id byte, v []byte) (int, bool) {
	switch id {
	case 0x24, 0x25, 0x28, 0x29, 0x2a: // byte
		return 1, len(v) >= 1
	case 0x13, 0x21, 0x22: // two-byte integer
		return 2, len(v) >= 2
	case 0x11, 0x27: // four-byte integer
		return 4, len(v) >= 4
	case 0x12, 0x15, 0x16, 0x1a, 0x1c, 0x1f: // string or binary
		if len(v) < 2 {
			return 0, false
		}
		n := 2 + int(binary.BigEndian.Uint16(v))
		return n, len(v) >= n
	case 0x26: // user property: two strings
		if len(v) < 2 {
			return 0, false
		}
		n := 2 + int(binary.BigEndian.Uint16(v))
		if len(v) < n+2 {
			return 0, false
		}
		n += 2 + int(binary.BigEndian.Uint16(v[n:]))
		return n, len(v) >= n
	}
	return 0, false
}

// setHandler makes fn receive every payload from now on (nil: drop them).
// The payload is valid only during the call.
func (s *benchSub) setHandler(fn func(payload []byte)) {
	if fn == nil {
		s.handler.Store(nil)
		return
	}
	s.handler.Store(&fn)
}

func (s *benchSub) write(p []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	_, err := s.conn.Write(p)
	return err
}

// readLoop reads packets until the connection ends; every PUBLISH goes to
// the handler, and the PUBACKs of all packets already buffered go out in
// one write before the next read from the socket.
func (s *benchSub) readLoop(r *bufio.Reader) error {
	var body, acks []byte
	for {
		typ, b, err := readPacket(r, body)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil
			}
			return err
		}
		body = b[:0]
		if typ>>4 == 3 { // PUBLISH
			id, payload, err := parsePublish(typ, b)
			if err != nil {
				return err
			}
			if fn := s.handler.Load(); fn != nil {
				(*fn)(payload)
			}
			if typ&0x06 != 0 {
				acks = append(acks, 0x40, 2, byte(id>>8), byte(id))
			}
		}
		if len(acks) > 0 && r.Buffered() == 0 {
			if err := s.write(acks); err != nil {
				return err
			}
			acks = acks[:0]
		}
	}
}

// readPacket reads one MQTT packet: its first byte and its body (into buf
// when it fits).
func readPacket(r *bufio.Reader, buf []byte) (byte, []byte, error) {
	typ, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	var n int
	for shift := 0; ; shift += 7 {
		c, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		if shift > 21 {
			return 0, nil, errors.New("malformed remaining length")
		}
		n |= int(c&0x7f) << shift
		if c&0x80 == 0 {
			break
		}
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, nil, err
	}
	return typ, buf, nil
}

// parsePublish returns a PUBLISH body's packet id (0 at QoS 0) and
// payload; its properties are skipped by their length.
func parsePublish(typ byte, b []byte) (uint16, []byte, error) {
	if len(b) < 2 {
		return 0, nil, errors.New("PUBLISH shorter than its topic length")
	}
	i := 2 + int(binary.BigEndian.Uint16(b))
	var id uint16
	if typ&0x06 != 0 {
		if len(b) < i+2 {
			return 0, nil, errors.New("PUBLISH without its packet id")
		}
		id = binary.BigEndian.Uint16(b[i:])
		i += 2
	}
	if len(b) < i {
		return 0, nil, errors.New("PUBLISH shorter than its topic")
	}
	_, rest, err := splitProps(b[i:])
	if err != nil {
		return 0, nil, fmt.Errorf("PUBLISH properties: %w", err)
	}
	return id, rest, nil
}

// splitProps splits b into an MQTT v5 property block and what follows it.
func splitProps(b []byte) (props, rest []byte, err error) {
	var n, i int
	for shift := 0; ; shift += 7 {
		if i >= len(b) || shift > 21 {
			return nil, nil, errors.New("malformed property length")
		}
		c := b[i]
		i++
		n |= int(c&0x7f) << shift
		if c&0x80 == 0 {
			break
		}
	}
	if len(b) < i+n {
		return nil, nil, errors.New("property length beyond the packet")
	}
	return b[i : i+n], b[i+n:], nil
}

func appendString(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint16(b, uint16(len(s))), s...)
}

func appendPacket(b []byte, typ byte, body []byte) []byte {
	b = append(b, typ)
	for n := len(body); ; {
		c := byte(n & 0x7f)
		n >>= 7
		if n > 0 {
			c |= 0x80
		}
		b = append(b, c)
		if n == 0 {
			break
		}
	}
	return append(b, body...)
}

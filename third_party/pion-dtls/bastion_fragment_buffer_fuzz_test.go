// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"context"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"time"

	dtlsnet "github.com/pion/dtls/v3/pkg/net"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/pion/transport/v5/dpipe"
)

// bastionRecordingConn keeps a copy of every datagram written on it.
type bastionRecordingConn struct {
	net.Conn
	mu  sync.Mutex
	out [][]byte
}

func (c *bastionRecordingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.out = append(c.out, append([]byte(nil), b...))
	c.mu.Unlock()

	return c.Conn.Write(b)
}

func (c *bastionRecordingConn) datagrams() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()

	return c.out
}

// bastionRecords cuts datagrams into their records.
func bastionRecords(datagrams [][]byte) [][]byte {
	var recs [][]byte
	for _, d := range datagrams {
		for len(d) >= recordlayer.FixedHeaderSize {
			n := recordlayer.FixedHeaderSize + int(binary.BigEndian.Uint16(d[recordlayer.FixedHeaderSize-2:]))
			if n > len(d) {
				break
			}
			recs = append(recs, d[:n])
			d = d[n:]
		}
	}

	return recs
}

// bastionFlights runs a real handshake (ECDHE-ECDSA, both sides with a
// certificate, an MTU of 200 bytes so that the certificates are sent in
// several fragments) and returns the records each side sent, in order.
func bastionFlights(tb testing.TB) (fromClient, fromServer [][]byte) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ca, cb := dpipe.Pipe()
	rc, rs := &bastionRecordingConn{Conn: ca}, &bastionRecordingConn{Conn: cb}
	done := make(chan error, 1)
	go func() {
		server, err := testServer(ctx, dtlsnet.PacketConnFromConn(rs), rs.RemoteAddr(),
			&Config{MTU: 200, ClientAuth: RequireAnyClientCert}, true)
		if err == nil {
			err = server.Close() //nolint:contextcheck
		}
		done <- err
	}()
	client, err := testClient(ctx, dtlsnet.PacketConnFromConn(rc), rc.RemoteAddr(), &Config{MTU: 200}, true)
	if err != nil {
		tb.Fatalf("handshake: %v", err)
	}
	if err := <-done; err != nil {
		tb.Fatalf("server handshake: %v", err)
	}
	_ = client.Close()

	return bastionRecords(rc.datagrams()), bastionRecords(rs.datagrams())
}

// bastionPackRecords is the fuzz input of records: each with a 2-byte
// length before it.
func bastionPackRecords(recs [][]byte) []byte {
	var b []byte
	for _, r := range recs {
		b = binary.BigEndian.AppendUint16(b, uint16(len(r))) //nolint:gosec // records are < 64 KiB
		b = append(b, r...)
	}

	return b
}

// bastionOverlapping returns the plaintext handshake records of recs with
// each fragment cut in two that overlap: [0, 2/3) and [1/3, 1) of it.
func bastionOverlapping(recs [][]byte) [][]byte {
	var out [][]byte
	for _, r := range recs {
		if r[0] != byte(protocol.ContentTypeHandshake) || binary.BigEndian.Uint16(r[3:]) != 0 {
			continue
		}
		var h handshake.Header
		body := r[recordlayer.FixedHeaderSize:]
		if h.Unmarshal(body) != nil || h.FragmentLength < 3 || int(handshake.HeaderLength+h.FragmentLength) > len(body) {
			continue
		}
		data := body[handshake.HeaderLength : handshake.HeaderLength+h.FragmentLength]
		third := uint32(len(data) / 3)                                                 //nolint:gosec
		for _, part := range [][2]uint32{{0, 2 * third}, {third, uint32(len(data))}} { //nolint:gosec
			ph := h
			ph.FragmentOffset, ph.FragmentLength = h.FragmentOffset+part[0], part[1]-part[0]
			raw, _ := ph.Marshal()
			rec := append([]byte(nil), r[:recordlayer.FixedHeaderSize]...)
			rec = append(append(rec, raw...), data[part[0]:part[1]]...)
			binary.BigEndian.PutUint16(rec[recordlayer.FixedHeaderSize-2:], uint16(len(rec)-recordlayer.FixedHeaderSize)) //nolint:gosec
			out = append(out, rec)
		}
	}

	return out
}

// bastionFragment is one handshake fragment the buffer was pushed.
type bastionFragment struct {
	header handshake.Header
	data   []byte
}

// FuzzBastionFragmentBuffer pushes arbitrary records into a fragment
// buffer (patches (38), (55), (60) rewrote its reassembly) and pops every
// message it completes. The input is a list of records (a 2-byte length
// before each) after a flags byte (bit 0: the buffer is a server's after
// its handshake, patch (60)); the seeds are the records of a real
// handshake's flights, fragmented by a small MTU, in order, reversed, and
// each record twice (retransmission). Whatever the records: what the
// buffer holds stays within fragmentBufferMaxHeld; its counters are the
// sum of what its entries hold (so 0 when it holds nothing); a popped
// message is a whole handshake message (offset 0, fragment length = length
// = its body), numbered in order, of the type and length its fragments
// gave, each byte of it carried at that offset by a fragment pushed for
// that message.
func FuzzBastionFragmentBuffer(f *testing.F) {
	fromClient, fromServer := bastionFlights(f)
	// The seeds reassemble: the server's flights in order give up its
	// messages, some of them sent in several fragments.
	buf, popped, fragmented := newFragmentBuffer(), 0, false
	for _, r := range fromServer {
		if r[0] != byte(protocol.ContentTypeHandshake) || binary.BigEndian.Uint16(r[3:]) != 0 {
			continue // encrypted: the connection decrypts before it pushes
		}
		var h handshake.Header
		if h.Unmarshal(r[recordlayer.FixedHeaderSize:]) == nil && h.FragmentLength < h.Length {
			fragmented = true
		}
		if _, _, err := buf.push(r); err != nil {
			f.Fatalf("push a record of the server's flights: %v", err)
		}
		for msg, _ := buf.pop(); msg != nil; msg, _ = buf.pop() {
			popped++
		}
	}
	if popped < 4 || !fragmented {
		f.Fatalf("the captured server flights gave %d messages (fragmented: %v), want a ServerHello, Certificate, ServerKeyExchange, CertificateRequest... some in fragments", popped, fragmented)
	}
	for _, recs := range [][][]byte{fromClient, fromServer} {
		f.Add(append([]byte{0}, bastionPackRecords(recs)...))
		reversed := make([][]byte, 0, len(recs))
		twice := make([][]byte, 0, 2*len(recs))
		for i := range recs {
			reversed = append(reversed, recs[len(recs)-1-i])
			twice = append(twice, recs[i], recs[i])
		}
		f.Add(append([]byte{0}, bastionPackRecords(reversed)...))
		f.Add(append([]byte{0}, bastionPackRecords(twice)...))
	}
	f.Add(append([]byte{1}, bastionPackRecords(fromClient)...))
	// A retransmission fragmented differently (RFC 6347 4.2.3): each
	// fragment again as two that overlap by a third.
	f.Add(append([]byte{0}, bastionPackRecords(bastionOverlapping(fromServer))...))

	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		buf := newFragmentBuffer()
		buf.afterHandshake = in[0]&1 != 0
		pushed := map[uint16][]bastionFragment{}
		next := uint16(0)
		for in = in[1:]; len(in) >= 2; {
			n := min(int(binary.BigEndian.Uint16(in)), len(in)-2)
			rec := in[2 : 2+n]
			in = in[2+n:]
			// What the record carries, read before the push (the
			// buffer copies; the record's bytes could be reused).
			if len(rec) >= recordlayer.FixedHeaderSize {
				for b := rec[recordlayer.FixedHeaderSize:]; len(b) > 0; {
					var h handshake.Header
					if h.Unmarshal(b) != nil || int(handshake.HeaderLength+h.FragmentLength) > len(b) {
						break
					}
					end := int(handshake.HeaderLength + h.FragmentLength)
					pushed[h.MessageSequence] = append(pushed[h.MessageSequence],
						bastionFragment{h, append([]byte(nil), b[handshake.HeaderLength:end]...)})
					b = b[end:]
				}
			}
			_, _, _ = buf.push(rec)
			bastionCheckFragmentBuffer(t, buf)
			for range 64 { // at most one message per pop
				msg, _ := buf.pop()
				if msg == nil {
					break
				}
				bastionCheckPopped(t, msg, next, pushed[next])
				next++
				bastionCheckFragmentBuffer(t, buf)
			}
		}
	})
}

// bastionCheckFragmentBuffer checks the bound and that the counters are
// what the entries hold.
func bastionCheckFragmentBuffer(t *testing.T, buf *fragmentBuffer) {
	t.Helper()
	if buf.held() > fragmentBufferMaxHeld {
		t.Fatalf("the buffer holds %d, over its bound %d", buf.held(), fragmentBufferMaxHeld)
	}
	count, size := 0, 0
	for _, e := range buf.cache {
		if e.whole != nil {
			count++
			size += len(e.whole) - handshake.HeaderLength
		}
		count += len(e.ranges)
		for _, r := range e.ranges {
			size += len(r.data)
		}
	}
	if count != buf.totalFragmentCount || size != buf.totalBufferSize {
		t.Fatalf("counters say %d fragments of %d bytes; the entries hold %d of %d", buf.totalFragmentCount, buf.totalBufferSize, count, size)
	}
}

// bastionCheckPopped checks a popped message against the fragments pushed
// for its message sequence number.
func bastionCheckPopped(t *testing.T, msg []byte, seq uint16, frags []bastionFragment) {
	t.Helper()
	var h handshake.Header
	if err := h.Unmarshal(msg); err != nil {
		t.Fatalf("popped message %d has no handshake header: %v", seq, err)
	}
	body := msg[handshake.HeaderLength:]
	if h.MessageSequence != seq || h.FragmentOffset != 0 || h.FragmentLength != h.Length || int(h.Length) != len(body) {
		t.Fatalf("popped message %d: header %+v with a %d-byte body, want message %d whole", seq, h, len(body), seq)
	}
	for i, c := range body {
		found := false
		for _, fr := range frags {
			if fr.header.Type == h.Type && fr.header.Length == h.Length &&
				uint32(i) >= fr.header.FragmentOffset && uint32(i) < fr.header.FragmentOffset+uint32(len(fr.data)) && //nolint:gosec
				fr.data[uint32(i)-fr.header.FragmentOffset] == c { //nolint:gosec
				found = true

				break
			}
		}
		if !found {
			t.Fatalf("popped message %d (type %d, %d bytes): byte %d (%#x) is in no fragment pushed for it", seq, h.Type, h.Length, i, c)
		}
	}
}

package upstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// pahoPublish is the PUBLISH as paho's encoder writes it.
func pahoPublish(id uint16, qos byte, topic string, payload []byte, gateway string, seq uint64) []byte {
	p := packets.Publish{PacketID: id, QoS: qos, Topic: topic, Payload: payload,
		Properties: &packets.Properties{User: []packets.User{
			{Key: OriginProperty, Value: gateway},
			{Key: SeqProperty, Value: strconv.FormatUint(seq, 10)},
		}}}
	var b bytes.Buffer
	if _, err := p.WriteTo(&b); err != nil {
		panic(err)
	}
	return b.Bytes()
}

// TestAppendPublish: the link's own PUBLISH encoder writes exactly what
// paho's does, and paho's decoder reads it back, for remaining lengths of
// one to three bytes and both QoS.
func TestAppendPublish(t *testing.T) {
	for _, c := range []struct {
		id      uint16
		qos     byte
		topic   string
		payload int
		gateway string
		seq     uint64
	}{
		{1, 1, "bastion/gw1/d1/t/temp", 100, "gw1", 1},
		{65535, 1, "bastion/gw1/d1/t", 0, "gw1", 18446744073709551615},
		{0, 0, "bastion/gw-0042/sensor.7/t/a/b/", 20, "gw-0042", 1234567},
		{300, 1, strings.Repeat("t", 200), 200, strings.Repeat("g", 64), 99},
		{7, 1, "bastion/gw1/d1/t/big", 20000, "gw1", 5},
		{8, 1, "bastion/gw1/d1/t/huge", 256 << 10, "gw1", 6},
	} {
		payload := bytes.Repeat([]byte{0xa5}, c.payload)
		prefix := []byte("earlier packets")
		got := appendPublish(append([]byte(nil), prefix...), c.id, c.qos, c.topic, payload, c.gateway, c.seq)
		want := append(append([]byte(nil), prefix...), pahoPublish(c.id, c.qos, c.topic, payload, c.gateway, c.seq)...)
		if !bytes.Equal(got, want) {
			t.Errorf("appendPublish(%d, %d, %q, %d bytes, %q, %d) (-paho +ours):\n%s", c.id, c.qos, c.topic, c.payload, c.gateway, c.seq, cmp.Diff(want, got))
			continue
		}
		cp, err := packets.ReadPacket(bytes.NewReader(got[len(prefix):]))
		if err != nil {
			t.Fatalf("paho cannot read our PUBLISH: %v", err)
		}
		p := cp.Content.(*packets.Publish)
		if p.Topic != c.topic || p.QoS != c.qos || !bytes.Equal(p.Payload, payload) || (c.qos > 0 && p.PacketID != c.id) {
			t.Errorf("paho read back topic %q qos %d id %d, %d bytes", p.Topic, p.QoS, p.PacketID, len(p.Payload))
		}
	}
}

// TestAppendPublishAllocs: appending to a buffer with room allocates nothing.
func TestAppendPublishAllocs(t *testing.T) {
	buf := make([]byte, 0, 4096)
	payload := make([]byte, 100)
	allocs := testing.AllocsPerRun(1000, func() {
		buf = appendPublish(buf[:0], 17, 1, "bastion/gw1/dev-17/t/sensors/temp", payload, "gw1", 123456789)
	})
	if allocs != 0 {
		t.Errorf("appendPublish: %.1f allocations, want 0", allocs)
	}
}

// chunkConn is a connection whose reads return at most chunk bytes of data,
// then io.EOF.
type chunkConn struct {
	net.Conn
	data  []byte
	chunk int
}

func (c *chunkConn) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), c.chunk, len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

// ackSource is a Source that records Ack calls.
type ackSource struct {
	bridges.Sink
	acks [][]uint64
}

func (s *ackSource) Next(context.Context, uint64, int) ([]queue.Entry, error) { return nil, nil }
func (s *ackSource) Ack(seqs ...uint64) error {
	s.acks = append(s.acks, append([]uint64(nil), seqs...))
	return nil
}

// readerSetup is a session on a packetConn over data read chunk bytes at a
// time, with PUBLISHes seq 101..108 awaiting PUBACKs as ids 1..8, from
// device readerDev(id): odd ids are d1's, even ids d2's.
func readerSetup(t testing.TB, data []byte, chunk int) (*packetConn, *ackSource, *sendRun) {
	pc := &packetConn{Conn: &chunkConn{data: data, chunk: chunk}}
	s := newLinkSession()
	if err := s.ConAckReceived(pc, nil, &packets.Connack{}); err != nil {
		t.Fatal(err)
	}
	src := &ackSource{}
	u := &Upstream{q: src, m: newMetrics(), log: testLog()}
	u.cur.Store(&snapshot{})
	r := &sendRun{u: u, cancel: func() {}}
	gen, _, _ := s.connection()
	for i := range 8 {
		if id, _, full, err := s.addPublish(gen, 64, r, uint64(101+i), readerDev(uint16(i+1))); err != nil || full || id != uint16(i+1) {
			t.Fatalf("addPublish: id %d full %v %v", id, full, err)
		}
	}
	return pc, src, r
}

func readerDev(id uint16) string {
	if id%2 == 1 {
		return "d1"
	}
	return "d2"
}

func encode(t testing.TB, p interface {
	WriteTo(io.Writer) (int64, error)
}) []byte {
	var b bytes.Buffer
	if _, err := p.WriteTo(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestReadTakesPubacks: PUBACKs are completed from the stream (successes
// of one read in one queue Ack, a refusal kept and reported, after it no
// success of the refused message's device acknowledged but the other
// device's still are, unknown ids ignored) and paho reads every other
// packet exactly as sent, however the connection splits the bytes.
func TestReadTakesPubacks(t *testing.T) {
	reason := "quota exceeded"
	refusal := encode(t, &packets.Puback{PacketID: 3, ReasonCode: 0x97, Properties: &packets.Properties{ReasonString: reason}})
	suback := encode(t, &packets.Suback{PacketID: 9, Reasons: []byte{1}, Properties: &packets.Properties{}})
	down := encode(t, &packets.Publish{PacketID: 7, QoS: 1, Topic: "bastion/gw1/d1/c/x", Payload: bytes.Repeat([]byte("p"), 5000), Properties: &packets.Properties{}})
	var stream []byte
	stream = append(stream, 0x40, 2, 0, 1)       // PUBACK 1, success, short form
	stream = append(stream, 0x40, 3, 0, 2, 0x10) // PUBACK 2, "no matching subscribers" (a success)
	stream = append(stream, suback...)
	stream = append(stream, refusal...)
	stream = append(stream, down...)
	stream = append(stream, 0xd0, 0)             // PINGRESP
	stream = append(stream, 0x40, 2, 0, 99)      // PUBACK for an id not in use
	stream = append(stream, 0x40, 2, 0, 4)       // PUBACK 4 (d2)
	stream = append(stream, 0x40, 4, 0, 5, 0, 0) // PUBACK 5 with empty properties (d1, after d1's refusal)
	for _, chunk := range []int{1, 2, 3, 5, 7, 64, 4096, len(stream)} {
		pc, src, r := readerSetup(t, stream, chunk)
		var types []byte
		for {
			cp, err := packets.ReadPacket(pc)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("chunk %d: paho read: %v", chunk, err)
			}
			types = append(types, cp.Type)
			if p, ok := cp.Content.(*packets.Publish); ok && len(p.Payload) != 5000 {
				t.Errorf("chunk %d: downlink payload %d bytes, want 5000", chunk, len(p.Payload))
			}
		}
		if diff := cmp.Diff([]byte{packets.SUBACK, packets.PUBLISH, packets.PINGRESP}, types); diff != "" {
			t.Errorf("chunk %d: packets paho read (-want +got):\n%s", chunk, diff)
		}
		var acked []uint64
		for _, a := range src.acks {
			acked = append(acked, a...)
		}
		// 103 (d1) was refused: 105 (d1) stays queued so that it is resent
		// after 103; 104 (d2) is deleted.
		if diff := cmp.Diff([]uint64{101, 102, 104}, acked); diff != "" {
			t.Errorf("chunk %d: acked in the queue (-want +got):\n%s", chunk, diff)
		}
		if chunk == len(stream) && len(src.acks) != 2 {
			t.Errorf("one read: %d queue Acks %v, want 2 (before and after the refusal)", len(src.acks), src.acks)
		}
		if !r.failed.Load() {
			t.Errorf("chunk %d: the refusal of seq 103 did not fail the run", chunk)
		}
	}
}

// TestPahoPathHoldsDevice: a PUBACK packetConn leaves to paho (one larger
// than its read buffer, with a long reason string) is completed through
// linkSession.PacketReceived and keeps the same rule: after d1's 103 is
// refused, d1's 105 is not acknowledged and d2's 104 is.
func TestPahoPathHoldsDevice(t *testing.T) {
	pc, src, r := readerSetup(t, nil, 1)
	s := pc.sink.Load().s
	long := strings.Repeat("r", readBufSize)
	for _, p := range []*packets.Puback{
		{PacketID: 3, ReasonCode: 0x97, Properties: &packets.Properties{ReasonString: long}},
		{PacketID: 4, Properties: &packets.Properties{ReasonString: long}},
		{PacketID: 5, Properties: &packets.Properties{ReasonString: long}},
	} {
		if err := s.PacketReceived(&packets.ControlPacket{Content: p}, nil); err != nil {
			t.Fatalf("PacketReceived(PUBACK %d): %v", p.PacketID, err)
		}
	}
	if diff := cmp.Diff([][]uint64{{104}}, src.acks); diff != "" {
		t.Errorf("queue Acks (-want +got):\n%s", diff)
	}
	if !r.failed.Load() {
		t.Errorf("the refusal of seq 103 did not fail the run")
	}
}

// FuzzPacketConnRead: the bytes come from the broker. However they are
// split, Read never panics, gives paho exactly the stream without the
// well-formed PUBACKs (as a whole-buffer parse finds them), and completes
// those PUBACKs' messages in order.
func FuzzPacketConnRead(f *testing.F) {
	f.Add([]byte{0x40, 2, 0, 1, 0xd0, 0, 0x40, 3, 0, 2, 0x97}, uint8(1))
	f.Add([]byte{0x90, 3, 0, 9, 1, 0x40, 2, 0, 4, 0x40, 1, 0}, uint8(3))
	f.Add([]byte{0x40, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x40, 2, 0, 1}, uint8(2))
	f.Add([]byte{0x30, 0x80, 0x01, 0, 1, 'a'}, uint8(200))
	f.Add([]byte{0x40, 2, 0}, uint8(1))
	var enc []byte // paho's encoder: a refusal with a reason string, a SUBACK, a downlink PUBLISH, a PUBACK
	enc = append(enc, encode(f, &packets.Puback{PacketID: 3, ReasonCode: 0x97, Properties: &packets.Properties{ReasonString: "quota exceeded"}})...)
	enc = append(enc, encode(f, &packets.Suback{PacketID: 9, Reasons: []byte{1}, Properties: &packets.Properties{}})...)
	enc = append(enc, encode(f, &packets.Publish{PacketID: 7, QoS: 1, Topic: "bastion/gw1/d1/c/x", Payload: []byte("on"), Properties: &packets.Properties{}})...)
	enc = append(enc, encode(f, &packets.Puback{PacketID: 1, Properties: &packets.Properties{}})...)
	f.Add(enc, uint8(5))
	f.Add([]byte{0x30, 0xff, 0xff, 0xff, 0x7f}, uint8(4))                 // 256 MiB claimed
	f.Add([]byte{0x40, 2, 0, 1, 0x30, 0x81, 0x80, 0x10, 0, 1}, uint8(64)) // a PUBACK, then 256 KiB + 1 claimed
	f.Fuzz(func(t *testing.T, data []byte, chunk uint8) {
		wantPass, wantAcks, wantRefused := refSplit(data)
		pc, src, _ := readerSetup(t, data, int(chunk)%64+1)
		var got []byte
		var readErr error
		buf := make([]byte, 37)
		for range len(data) + 2 {
			n, err := pc.Read(buf)
			got = append(got, buf[:n]...)
			if err != nil {
				readErr = err
				break
			}
		}
		if !bytes.Equal(wantPass, got) {
			t.Fatalf("paho got (-want +got):\n%s", cmp.Diff(wantPass, got))
		}
		var refused *readRefusal
		if errors.As(readErr, &refused) != (wantRefused != "") || refused != nil && refused.result != wantRefused {
			t.Fatalf("Read ended with %v, want a refusal %q (none: EOF)", readErr, wantRefused)
		}
		if refused != nil {
			// Refused once, refused for good: nothing more reaches paho.
			if n, err := pc.Read(buf); n != 0 || err != readErr {
				t.Fatalf("Read after the refusal: %d bytes, %v; want 0 and the same refusal", n, err)
			}
		}
		var acked []uint64
		for _, a := range src.acks {
			acked = append(acked, a...)
		}
		if diff := cmp.Diff(wantAcks, acked); diff != "" {
			t.Fatalf("acked (-want +got):\n%s", diff)
		}
	})
}

// refSplit parses the whole stream: the bytes paho must get, the seqs
// acknowledged (ids 1..8 are seqs 101..108, each once, successes only, none
// of a device after a refusal of one of its messages), and the result of
// the refusal that ends reading ("": none, the stream ends). A packet with
// a remaining length of more than 4 bytes, or larger than the announced
// Maximum Packet Size, is refused: nothing of it or after it reaches paho.
func refSplit(data []byte) (pass []byte, acks []uint64, refused string) {
	pass = []byte{}
	used := map[uint16]bool{}
	held := map[string]bool{}
	for len(data) > 0 {
		rem, hl, ok := fixedHeader(data)
		if hl < 0 {
			return pass, acks, readMalformed
		}
		if !ok {
			return pass, acks, "" // a header cut by the end: never complete
		}
		if hl+rem > maxDownlinkPacket {
			return pass, acks, readTooLarge
		}
		if data[0] == 0x40 && rem >= 2 && hl+rem <= readBufSize {
			if len(data) < hl+rem {
				return pass, acks, ""
			}
			id := uint16(data[hl])<<8 | uint16(data[hl+1])
			if id >= 1 && id <= 8 && !used[id] {
				used[id] = true
				switch {
				case rem > 2 && data[hl+2] >= 0x80:
					held[readerDev(id)] = true
				case !held[readerDev(id)]:
					acks = append(acks, 100+uint64(id))
				}
			}
			data = data[hl+rem:]
			continue
		}
		n := min(hl+rem, len(data))
		pass = append(pass, data[:n]...)
		data = data[n:]
	}
	return pass, acks, ""
}

// TestWriteDeadline: a peer that reads nothing makes the link's write time
// out after writeTimeout (it used to block until paho's keepalive gave up,
// holding the lock paho's own packets need), and a write of many chunks
// to a peer that reads is not cut short by it (the deadline is per chunk).
func TestWriteDeadline(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func() (client, server net.Conn) {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return c, s
	}

	c, s := dial()
	defer s.Close()
	pc := &packetConn{Conn: c, writeTimeout: 200 * time.Millisecond}
	defer pc.Close()
	start := time.Now()
	_, err = pc.writePackets(make([]byte, 64<<20)) // far more than the socket buffers hold
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a peer that reads nothing: %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the write took %v to time out, want about 200ms", d)
	}
	// paho's path (it locks the connection around a packet) is not held.
	done := make(chan error, 1)
	go func() {
		_, err := packets.NewControlPacket(packets.PINGREQ).WriteTo(pc)
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("paho's write still blocked after the link's write timed out")
	}

	// A slow reader: the write takes several times writeTimeout in all,
	// but each 64 KiB chunk is taken within it.
	c2, s2 := dial()
	defer s2.Close()
	// A fixed send buffer: autotuned to 4 MiB on loopback, it wakes a
	// blocked writer only once a third of it has drained.
	c2.(*net.TCPConn).SetWriteBuffer(128 << 10)
	// 1 s: the reader sleeps 10 ms per 32 KiB; on a loaded box (tests in
	// parallel, -race) 500 ms between two of its reads was seen once.
	pc2 := &packetConn{Conn: c2, writeTimeout: time.Second}
	defer pc2.Close()
	read := make(chan int, 1)
	go func() {
		n := 0
		buf := make([]byte, 32<<10)
		for {
			time.Sleep(10 * time.Millisecond)
			k, err := s2.Read(buf)
			n += k
			if err != nil {
				read <- n
				return
			}
		}
	}()
	const total = 8 << 20
	start = time.Now()
	if _, err := pc2.writePackets(make([]byte, total)); err != nil {
		t.Fatalf("write to a peer that reads slowly: %v (after %v)", err, time.Since(start))
	}
	took := time.Since(start)
	pc2.Close()
	if n := <-read; n != total {
		t.Errorf("peer read %d bytes, want %d", n, total)
	}
	if took < 2*pc2.writeTimeout {
		t.Logf("the write took %v: the reader was not slow enough to show the deadline is per chunk", took)
	}
}

// TestReadRefusesOversizePacket: a packet from the broker larger than the
// Maximum Packet Size the link announced (maxDownlinkPacket), or whose
// remaining length takes more than 4 bytes, fails paho's read with a
// refusal naming the size and the limit, before paho allocates its body:
// paho's reader grows its buffer to the whole remaining length first, so a
// header claiming 256 MiB had bastiond allocate 256 MiB (and the broker
// could repeat it at every reconnect). The same before the CONNACK (no
// session yet) and after it; PUBACKs read before it are still completed.
func TestReadRefusesOversizePacket(t *testing.T) {
	atLimit := appendVBI([]byte{0x30}, maxDownlinkPacket-4) // header 4 bytes: exactly the limit
	for _, c := range []struct {
		name    string
		data    []byte
		session bool
		result  string
		want    string
	}{
		{"PUBLISH of 256 MiB", []byte{0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, 'x'}, true, readTooLarge, "of 268435460 bytes, larger than the Maximum Packet Size of 262144 bytes"},
		{"CONNACK of 256 MiB", []byte{0x20, 0xff, 0xff, 0xff, 0x7f}, false, readTooLarge, "of 268435460 bytes, larger than the Maximum Packet Size of 262144 bytes"},
		{"one byte over", appendVBI([]byte{0x30}, maxDownlinkPacket-3), true, readTooLarge, "of 262145 bytes, larger"},
		{"five length bytes", []byte{0x30, 0x80, 0x80, 0x80, 0x80, 0x01, 0, 1, 'x'}, true, readMalformed, "more than 4 bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var pc *packetConn
			var src *ackSource
			if c.session {
				// A PUBACK first: completed, though reading ends after it.
				pc, src, _ = readerSetup(t, append([]byte{0x40, 2, 0, 1}, c.data...), 4096)
			} else {
				pc = &packetConn{Conn: &chunkConn{data: c.data, chunk: 4096}}
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := packets.ReadPacket(pc)
			runtime.ReadMemStats(&after)
			if grown := after.TotalAlloc - before.TotalAlloc; grown > 1<<20 {
				t.Errorf("paho's read of the refused packet allocated %d bytes, want well under 1 MiB", grown)
			}
			var r *readRefusal
			if !errors.As(err, &r) || r.result != c.result || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("paho's read: %v; want a %s refusal saying %q", err, c.result, c.want)
			}
			if st := pc.end.state(); st.cause != endBrokerFault {
				t.Errorf("the connection's end: %+v, want the broker's fault (not counted against a message)", st)
			}
			if src != nil {
				if diff := cmp.Diff([][]uint64{{101}}, src.acks); diff != "" {
					t.Errorf("acked before the refusal (-want +got):\n%s", diff)
				}
			}
		})
	}
	// A packet of exactly the limit is read.
	pc := &packetConn{Conn: &chunkConn{data: append(atLimit, make([]byte, maxDownlinkPacket-4)...), chunk: 4096}}
	if _, err := io.Copy(io.Discard, pc); err != nil {
		t.Fatalf("a packet of exactly %d bytes: %v, want it read", maxDownlinkPacket, err)
	}
}

package queue

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/google/go-cmp/cmp"
)

// appendMsg appends a message record to dst, checksummed unkeyed.
func appendMsg(dst []byte, seq uint64, m *bridges.Message) []byte {
	start := len(dst)
	dst = frameMsg(dst, seq, m)
	seal(dst[start:], 0)
	return dst
}

// appendAck appends an ack record listing seqs (ascending) to dst,
// checksummed unkeyed.
func appendAck(dst []byte, seqs []uint64) []byte {
	start := len(dst)
	dst = frameAck(dst, seqs)
	seal(dst[start:], 0)
	return dst
}

// appendMoved appends the moved copy of the message record rec, as compact
// makes it (the same body, kind kindMoved), checksummed unkeyed.
func appendMoved(dst, rec []byte) []byte {
	start := len(dst)
	dst = append(dst, rec...)
	dst[start+recHeader] = kindMoved
	seal(dst[start:], 0)
	return dst
}

// decodeRecord decodes the record at the start of b and returns it with its
// total length. It never panics and never allocates more than the record's
// own (checksummed, bounded) length. A message's Payload is a slice of b
// (capacity cut to the payload): b must not be changed while it is used.
func decodeRecord(b []byte) (record, int, error) {
	return decodeRecordIn(b, 0, nil)
}

var updateSeeds = flag.Bool("update-seeds", false, "rewrite testdata/fuzz/FuzzDecodeRecord seeds from the encoder")

// seedRecords is real encoder output: the fuzz seeds and the round-trip table.
func seedRecords() map[string][]byte {
	m := bridges.Message{Device: "sensor-1", Topic: "devices/sensor-1/t/temp", QoS: 1,
		Payload: []byte(`{"c":21.5,"rh":40}`), Received: time.Unix(1764000000, 123456789)}
	empty := bridges.Message{Device: "d", Topic: "devices/d/t", Received: time.Unix(0, 0)}
	full := appendMsg(nil, 42, &m)
	return map[string][]byte{
		"msg":        full,
		"moved":      appendMoved(nil, full),
		"msg-qos0":   appendMsg(nil, 1, &empty),
		"ack":        appendAck(nil, []uint64{1, 2, 3, 1000, 1 << 40}),
		"ack-empty":  appendAck(nil, nil),
		"two":        appendAck(appendMsg(nil, 7, &m), []uint64{7}),
		"torn-tail":  full[:len(full)-5],
		"bad-crc":    flip(full, recHeader+3),
		"big-length": append([]byte{0xff, 0xff, 0xff, 0xff}, full[4:]...),
	}
}

func TestWriteFuzzSeeds(t *testing.T) {
	if !*updateSeeds {
		t.Skip("run with -update-seeds to regenerate testdata/fuzz seeds")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzDecodeRecord")
	os.MkdirAll(dir, 0o755)
	for name, b := range seedRecords() {
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRecordRoundTrip(t *testing.T) {
	m := bridges.Message{Device: "a", Topic: "devices/a/t/x", QoS: 1, Payload: []byte{0, 1, 2}, Received: time.Unix(5, 6)}
	b := appendMsg(nil, 9, &m)
	rec, n, err := decodeRecord(b)
	if err != nil || n != len(b) {
		t.Fatalf("decode msg: n=%d err=%v", n, err)
	}
	if d := cmp.Diff(m, rec.msg); d != "" || rec.seq != 9 || rec.kind != kindMsg {
		t.Fatalf("msg round trip seq=%d (-want +got):\n%s", rec.seq, d)
	}
	// A moved copy decodes as the same message, every field kept.
	mv := appendMoved(nil, b)
	rec, n, err = decodeRecord(mv)
	if err != nil || n != len(mv) {
		t.Fatalf("decode moved: n=%d err=%v", n, err)
	}
	if d := cmp.Diff(m, rec.msg); d != "" || rec.seq != 9 || rec.kind != kindMoved {
		t.Fatalf("moved round trip seq=%d kind=%d (-want +got):\n%s", rec.seq, rec.kind, d)
	}
	acks := []uint64{3, 4, 90}
	rec, _, err = decodeRecord(appendAck(nil, acks))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(acks, rec.acks); d != "" {
		t.Fatalf("ack round trip (-want +got):\n%s", d)
	}
	seeds := seedRecords()
	for name, want := range map[string]error{"torn-tail": errShort, "bad-crc": errCorrupt, "big-length": errCorrupt} {
		if _, _, err := decodeRecord(seeds[name]); !errors.Is(err, want) {
			t.Errorf("%s: err %v, want %v", name, err, want)
		}
	}
}

// TestManyMarksSplit: delivered-marks that piled up are written as several
// records, each one the decoder takes, together every mark. One record
// for them all could be longer than the decoder's limit (maxRecBody): the
// next open read it as corrupt, losing every mark in it (their messages
// sent again). Spaced seqs take 7 bytes each: 700,000 marks are 4.9 MB.
func TestManyMarksSplit(t *testing.T) {
	seqs := make([]uint64, 700_000)
	for i := range seqs {
		seqs[i] = uint64(i+1) << 43
	}
	b := appendAck(nil, seqs)
	var got []uint64
	for off := 0; off < len(b); {
		rec, n, err := decodeRecord(b[off:])
		if err != nil {
			t.Fatalf("record at %d of %d bytes: %v", off, len(b), err)
		}
		if rec.kind != kindAck {
			t.Fatalf("record at %d: kind %d, want marks", off, rec.kind)
		}
		got = append(got, rec.acks...)
		off += n
	}
	if !slices.Equal(got, seqs) {
		t.Fatalf("decoded %d marks, want the %d written", len(got), len(seqs))
	}
}

// FuzzDecodeRecord: the decoder reads whatever a crash left on disk. It must
// never panic, never claim more bytes than it was given, and whatever it
// accepts must survive a re-encode unchanged.
func FuzzDecodeRecord(f *testing.F) {
	fuzzInterner = interner{}
	for _, b := range seedRecords() {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		// The checksum shields the body parser from most mutations; feed
		// it the raw bytes too so the fuzzer reaches it.
		_, _ = decodeBody(b, nil)
		rec, n, err := decodeRecord(b)
		// Through an interner (what Next uses): the same answer.
		irec, in, ierr := decodeRecordIn(b, 0, &fuzzInterner)
		if (ierr == nil) != (err == nil) || in != n || irec.msg.Device != rec.msg.Device || irec.msg.Topic != rec.msg.Topic {
			t.Fatalf("interned decode differs: %+v %d %v vs %+v %d %v", irec, in, ierr, rec, n, err)
		}
		if err != nil {
			if !errors.Is(err, errShort) && !errors.Is(err, errCorrupt) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if n < recHeader || n > len(b) {
			t.Fatalf("decoded length %d of %d bytes", n, len(b))
		}
		var re []byte
		switch rec.kind {
		case kindMsg:
			re = appendMsg(nil, rec.seq, &rec.msg)
		case kindMoved:
			re = appendMoved(nil, appendMsg(nil, rec.seq, &rec.msg))
		case kindAck:
			re = appendAck(nil, rec.acks)
		default:
			t.Fatalf("accepted kind %d", rec.kind)
		}
		rec2, n2, err := decodeRecord(re)
		if err != nil || n2 != len(re) {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if rec2.kind != rec.kind || rec2.seq != rec.seq || !bytes.Equal(rec2.msg.Payload, rec.msg.Payload) ||
			rec2.msg.Topic != rec.msg.Topic || rec2.msg.Device != rec.msg.Device || !rec2.msg.Received.Equal(rec.msg.Received) ||
			!cmp.Equal(rec2.acks, rec.acks) {
			t.Fatalf("re-encode changed the record: %+v vs %+v", rec, rec2)
		}
	})
}

// fuzzInterner is shared by FuzzDecodeRecord's inputs, so that values
// interned by one input are looked up by the next (inputs run one at a
// time in a worker process).
var fuzzInterner interner

// TestInterner: one string per distinct value, the same one each time;
// values above maxInternLen are not kept; at maxInterned values it starts
// over (bounded); decoded messages carry the right fields either way.
func TestInterner(t *testing.T) {
	var in interner
	a1, a2 := in.str([]byte("devices/d1/t/n")), in.str([]byte("devices/d1/t/n"))
	if a1 != "devices/d1/t/n" || unsafe.StringData(a1) != unsafe.StringData(a2) {
		t.Errorf("same value twice: %q %q, not one string", a1, a2)
	}
	if b := in.str([]byte("devices/d2/t/n")); b != "devices/d2/t/n" {
		t.Errorf("second value %q", b)
	}
	long := bytes.Repeat([]byte("x"), maxInternLen+1)
	if s := in.str(long); s != string(long) || len(in.m) != 2 {
		t.Errorf("long value: %d bytes back, %d kept, want %d and 2", len(s), len(in.m), len(long))
	}
	for i := range 3 * maxInterned {
		v := fmt.Sprintf("topic-%d", i)
		if s := in.str([]byte(v)); s != v {
			t.Fatalf("value %d: %q", i, s)
		}
		if len(in.m) > maxInterned {
			t.Fatalf("%d values kept, bound %d", len(in.m), maxInterned)
		}
	}
	m := bridges.Message{Device: "d1", Topic: "devices/d1/t/n", Payload: []byte("p"), QoS: 1, Received: time.Unix(0, 5)}
	rec, _, err := decodeRecordIn(appendMsg(nil, 9, &m), 0, &in)
	if err != nil || rec.msg.Device != m.Device || rec.msg.Topic != m.Topic || string(rec.msg.Payload) != "p" || rec.seq != 9 {
		t.Errorf("decoded %+v, %v", rec, err)
	}
}

// FuzzResync: over any bytes, resync never panics, and what it finds is a
// message record within the bounds it was given.
func FuzzResync(f *testing.F) {
	var seg []byte
	for _, b := range seedRecords() {
		seg = append(seg, b...)
	}
	f.Add(seg, uint16(1), uint64(0), uint64(1<<62))
	f.Add(append([]byte("\xaa\xaa\xaa"), seg...), uint16(0), uint64(0), uint64(1<<62))
	f.Fuzz(func(t *testing.T, data []byte, from uint16, after, before uint64) {
		// Unkeyed: a moved record is never taken (only keyed segments
		// hold them), so what is found is a message record.
		o := resync(data, 0, int(from), after, before, before, 256<<10)
		if o < 0 {
			return
		}
		if o < int(from) {
			t.Fatalf("resync from %d returned %d", from, o)
		}
		rec, _, err := decodeRecord(data[o:])
		if err != nil || rec.kind != kindMsg || rec.seq <= after || rec.seq >= before || rec.seq >= seqCeiling {
			t.Fatalf("resync returned %d: %+v %v (after %d, before %d)", o, rec, err, after, before)
		}
		if got := lostAtMost(data[o:], 0, after); got != rec.seq-after-1 {
			t.Fatalf("lostAtMost = %v, want %d", got, rec.seq-after-1)
		}
	})
}

package queue

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/bastion-iot/bastion/bridges"
)

// On-disk layout. A segment file starts with segMagic and a random salt of
// saltLen bytes (segHeader bytes in all), then records, then zeros up to
// the size it was preallocated to (no record starts with a zero length, so
// the first zero length after a record is the clean end):
//
//	u32 little-endian body length | u32 CRC-32C of salt || body | body
//
// The salt keys the checksum: the format and CRC-32C are public, and a
// device could otherwise embed a whole valid record (another device's
// message, a plausible seq) in its payload for resync to take after a torn
// or corrupt record. Without the salt, which never leaves the disk, such
// a record's checksum matches only by chance (2^-32). Segments written
// before the salt (segMagicV1, no salt: a segHeaderV1-byte header) are
// still read, with the unkeyed checksum, so that a queue survives an
// upgrade; new segments are always written keyed.
//
// body is one kind byte and its fields:
//
//	kindMsg: uvarint seq, varint received (Unix ns), byte QoS,
//	         uvarint len + device, uvarint len + topic, uvarint len + payload
//	kindAck: uvarint count, then count uvarint seqs, each a delta from the previous
//	kindMoved: as kindMsg: a held message copied forward from an older
//	         segment by compaction (see compact.go), every field as it was
//	         (its seq, below its segment's base, and its received time
//	         included). Only keyed segments hold one: in an unkeyed (v1)
//	         segment, or with a seq at or above its segment's base, it is
//	         not the queue's and is read as corrupt.
//
// A record is valid only if its length is sane, its checksum matches and its
// body decodes exactly; anything else after a crash is a torn tail.
const (
	segMagic    = "BSTNQ02\n"
	segMagicV1  = "BSTNQ01\n"
	saltLen     = 16
	segHeader   = len(segMagic) + saltLen
	segHeaderV1 = len(segMagicV1)
	recHeader   = 8
	kindMsg     = 1
	kindAck     = 2
	kindMoved   = 3
	maxRecBody  = 4 << 20 // hard ceiling for the decoder, above any configured message size
	// msgOverhead bounds a message body's bytes besides device, topic
	// and payload: kind, seq, received, QoS, three lengths.
	msgOverhead = 1 + 2*binary.MaxVarintLen64 + 1 + 3*binary.MaxVarintLen64
	// seqCeiling is above every sequence number the queue gives out: each
	// open moves on by seqGap (2^32 for MaxBytes up to 4 GiB), so reaching
	// it takes 2^31 opens. A message record at or above it was not written
	// by the queue: a record a device embedded in its payload, found by
	// resync after a torn or corrupt record, whose seq would push nextSeq
	// to wrap. Open refuses a nextSeq within two gaps of it.
	seqCeiling = 1 << 63
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var (
	// errShort means the bytes end inside a record: a torn write.
	errShort = errors.New("record truncated")
	// errCorrupt means the bytes are not a record: bad length, checksum or body.
	errCorrupt = errors.New("record corrupt")
)

type record struct {
	kind byte
	seq  uint64
	msg  bridges.Message
	acks []uint64
}

// frameMsg appends a message record to dst without its checksum, which
// seal adds for the segment the record goes to, known only when its batch
// is written (a rotation may come between); the writer does that outside
// the queue's lock, once per record.
func frameMsg(dst []byte, seq uint64, m *bridges.Message) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, recHeader)...)
	dst = append(dst, kindMsg)
	dst = binary.AppendUvarint(dst, seq)
	dst = binary.AppendVarint(dst, m.Received.UnixNano())
	dst = append(dst, m.QoS)
	dst = appendStr(dst, m.Device)
	dst = appendStr(dst, m.Topic)
	dst = appendBytes(dst, m.Payload)
	return frame(dst, start)
}

// maxAcksPerRecord bounds the seqs of one delivered-marks record: each
// takes at most binary.MaxVarintLen64 bytes, so its body stays well under
// maxRecBody however many marks piled up (while writes failed, or the
// queue was stopped) before one flush writes them all.
const maxAcksPerRecord = 64 << 10

// frameAck appends delivered-marks records for seqs (ascending) without
// their checksums (see frameMsg): one per maxAcksPerRecord seqs (one, empty,
// for none). A single record for all of them could be longer than the
// decoder takes (maxRecBody), and the next open would read it as corrupt
// and lose every mark in it: their messages sent again.
func frameAck(dst []byte, seqs []uint64) []byte {
	for {
		n := min(len(seqs), maxAcksPerRecord)
		dst = frameAckRecord(dst, seqs[:n])
		if seqs = seqs[n:]; len(seqs) == 0 {
			return dst
		}
	}
}

func frameAckRecord(dst []byte, seqs []uint64) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, recHeader)...)
	dst = append(dst, kindAck)
	dst = binary.AppendUvarint(dst, uint64(len(seqs)))
	var prev uint64
	for _, s := range seqs {
		dst = binary.AppendUvarint(dst, s-prev)
		prev = s
	}
	return frame(dst, start)
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

func appendStr(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// frame fills in the length of the record at dst[start:].
func frame(dst []byte, start int) []byte {
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(dst)-start-recHeader))
	return dst
}

// seal fills in the checksum of every record in b (whole records, as
// frameMsg and frameAck made them) with key, a segment's checksum key.
func seal(b []byte, key uint32) {
	for len(b) >= recHeader {
		n := int(binary.LittleEndian.Uint32(b))
		binary.LittleEndian.PutUint32(b[4:], crc32.Update(key, castagnoli, b[recHeader:recHeader+n]))
		b = b[recHeader+n:]
	}
}

// segKey is the checksum key of a segment with this salt: the CRC-32C
// state after the salt, so that a record's checksum is that of salt ||
// body without hashing the salt again for each record. 0 is the unkeyed
// checksum (a v1 segment's).
func segKey(salt []byte) uint32 { return crc32.Checksum(salt, castagnoli) }

// newSegHeader returns a new segment's header and its checksum key.
func newSegHeader() ([]byte, uint32) {
	h := make([]byte, segHeader)
	copy(h, segMagic)
	for {
		rand.Read(h[len(segMagic):]) // never fails (crypto/rand)
		// A salt whose key is 0 would leave the checksum unkeyed.
		if k := segKey(h[len(segMagic):]); k != 0 {
			return h, k
		}
	}
}

// parseSegHeader returns the length of the header data starts with and the
// segment's checksum key; ok is false if data does not start with one.
func parseSegHeader(data []byte) (n int, key uint32, ok bool) {
	switch {
	case len(data) >= segHeader && string(data[:len(segMagic)]) == segMagic:
		return segHeader, segKey(data[len(segMagic):segHeader]), true
	case len(data) >= segHeaderV1 && string(data[:len(segMagicV1)]) == segMagicV1:
		return segHeaderV1, 0, true
	}
	return 0, 0, false
}

// decodeRecordIn is decodeRecord for a segment whose checksum key is key,
// with a message's device and topic taken from in (nil: new strings).
func decodeRecordIn(b []byte, key uint32, in *interner) (record, int, error) {
	if len(b) < recHeader {
		return record{}, 0, errShort
	}
	n := binary.LittleEndian.Uint32(b)
	if n == 0 || n > maxRecBody {
		return record{}, 0, fmt.Errorf("%w: body length %d", errCorrupt, n)
	}
	if uint64(len(b)-recHeader) < uint64(n) {
		return record{}, 0, errShort
	}
	body := b[recHeader : recHeader+int(n)]
	if crc32.Update(key, castagnoli, body) != binary.LittleEndian.Uint32(b[4:]) {
		return record{}, 0, fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	r, err := decodeBody(body, in)
	if err != nil {
		return record{}, 0, fmt.Errorf("%w: %v", errCorrupt, err)
	}
	return r, recHeader + int(n), nil
}

type reader struct {
	b   []byte
	err error
	in  *interner // for str; nil: a new string each time
}

func (r *reader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errors.New("bad uvarint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = errors.New("bad varint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) byte1() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 1 {
		r.err = errors.New("short body")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

// field returns the next length-prefixed field, a slice of the body.
func (r *reader) field() []byte {
	n := r.uvarint()
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.err = fmt.Errorf("field length %d beyond body", n)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

// view is the next field as a slice of the body (nil if empty): no copy.
func (r *reader) view() []byte {
	if v := r.field(); len(v) > 0 {
		return v
	}
	return nil
}

// str is the next field as a string (one copy, or none if the interner
// has it).
func (r *reader) str() string {
	if r.in != nil {
		return r.in.str(r.field())
	}
	return string(r.field())
}

// interner hands out one string per distinct short value, so that reading
// a message back from the queue does not allocate its device id and topic
// again for every message: a device sends on a few topics, again and
// again. It is bounded (maxInterned values of at most maxInternLen bytes;
// when full it starts over) and not safe for concurrent use (the queue
// uses it under its lock).
type interner struct {
	m map[string]string
}

const (
	maxInterned  = 1024
	maxInternLen = 256
)

func (in *interner) str(b []byte) string {
	if s, ok := in.m[string(b)]; ok { // no allocation for the lookup
		return s
	}
	s := string(b)
	if len(b) > maxInternLen {
		return s
	}
	if in.m == nil {
		in.m = make(map[string]string)
	}
	if len(in.m) >= maxInterned {
		clear(in.m)
	}
	in.m[s] = s
	return s
}

func decodeBody(body []byte, in *interner) (record, error) {
	r := &reader{b: body, in: in}
	rec := record{kind: r.byte1()}
	switch rec.kind {
	case kindMsg, kindMoved:
		rec.seq = r.uvarint()
		rec.msg.Received = time.Unix(0, r.varint())
		rec.msg.QoS = r.byte1()
		rec.msg.Device = r.str()
		rec.msg.Topic = r.str()
		rec.msg.Payload = r.view()
		if r.err == nil && rec.msg.QoS > 1 {
			r.err = fmt.Errorf("QoS %d", rec.msg.QoS)
		}
	case kindAck:
		cnt := r.uvarint()
		// Each seq takes at least one byte: a count beyond the body is a lie.
		if r.err == nil && cnt > uint64(len(r.b)) {
			r.err = fmt.Errorf("ack count %d beyond body", cnt)
		}
		var prev uint64
		for i := uint64(0); i < cnt && r.err == nil; i++ {
			prev += r.uvarint()
			rec.acks = append(rec.acks, prev)
		}
	default:
		if r.err == nil {
			r.err = fmt.Errorf("unknown record kind %d", rec.kind)
		}
	}
	if r.err == nil && len(r.b) != 0 {
		r.err = fmt.Errorf("%d trailing bytes", len(r.b))
	}
	return rec, r.err
}

// resync returns the offset, at or after from, of the first record in data
// that decodes as a message whose seq is above after and below before (the
// next segment's base) and seqCeiling, or, in a keyed segment (key not 0),
// as a moved message whose seq is below base (the segment's own base; see
// kindMoved); -1 if there is none. It is how recover steps over corrupt or
// unreadable bytes (see recover). A length above
// maxMessage and the header's worth is not tried: over random bytes every
// 1,000th offset looks like a record of up to 4 MiB, and checksumming each
// would take seconds per damaged segment (a record that large, kept from a
// configuration with a higher limit, is then lost with the damage before
// it). A false match needs the CRC-32C and the exact decoding of the body
// to agree by chance, and in a keyed (v2) segment a record a device
// embedded in its payload is such a match: the device does not know the
// salt.
func resync(data []byte, key uint32, from int, after, before, base uint64, maxMessage int) int {
	limit := uint64(maxMessage) + 64 // kind, seq, time, QoS, three lengths
	for o := from; o+recHeader < len(data); o++ {
		n := uint64(binary.LittleEndian.Uint32(data[o:]))
		if n == 0 || n > limit || uint64(len(data)-o-recHeader) < n {
			continue
		}
		rec, _, err := decodeRecordIn(data[o:], key, nil)
		if err != nil {
			continue
		}
		if rec.kind == kindMsg && rec.seq > after && rec.seq < before && rec.seq < seqCeiling ||
			rec.kind == kindMoved && key != 0 && rec.seq < base && rec.seq < seqCeiling {
			return o
		}
	}
	return -1
}

// lostAtMost is how many sequence numbers at most were lost in the bytes
// recover skipped before the record at the start of b (which resync
// found), after lastSeq, the last message kept before them: any number if
// that record is a moved one (its seq says nothing of what came between).
func lostAtMost(b []byte, key uint32, lastSeq uint64) any {
	rec, _, _ := decodeRecordIn(b, key, nil)
	if rec.kind != kindMsg || rec.seq <= lastSeq {
		return "unknown (the next record kept is a moved message)"
	}
	return rec.seq - lastSeq - 1
}

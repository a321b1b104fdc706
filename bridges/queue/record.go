package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/bastion-iot/bastion/bridges"
)

// On-disk layout. A segment file starts with segMagic, then records, then
// zeros up to the size it was preallocated to (no record starts with a zero
// length, so the first zero length after a record is the clean end):
//
//	u32 little-endian body length | u32 CRC-32C of body | body
//
// body is one kind byte and its fields:
//
//	kindMsg: uvarint seq, varint received (Unix ns), byte QoS,
//	         uvarint len + device, uvarint len + topic, uvarint len + payload
//	kindAck: uvarint count, then count uvarint seqs, each a delta from the previous
//
// A record is valid only if its length is sane, its checksum matches and its
// body decodes exactly; anything else after a crash is a torn tail.
const (
	segMagic   = "BSTNQ01\n"
	recHeader  = 8
	kindMsg    = 1
	kindAck    = 2
	maxRecBody = 4 << 20 // hard ceiling for the decoder, above any configured message size
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

// appendMsg appends a message record to dst.
func appendMsg(dst []byte, seq uint64, m *bridges.Message) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, recHeader)...)
	dst = append(dst, kindMsg)
	dst = binary.AppendUvarint(dst, seq)
	dst = binary.AppendVarint(dst, m.Received.UnixNano())
	dst = append(dst, m.QoS)
	dst = appendStr(dst, m.Device)
	dst = appendStr(dst, m.Topic)
	dst = appendBytes(dst, m.Payload)
	return seal(dst, start)
}

// appendAck appends an ack record listing seqs (ascending) to dst.
func appendAck(dst []byte, seqs []uint64) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, recHeader)...)
	dst = append(dst, kindAck)
	dst = binary.AppendUvarint(dst, uint64(len(seqs)))
	var prev uint64
	for _, s := range seqs {
		dst = binary.AppendUvarint(dst, s-prev)
		prev = s
	}
	return seal(dst, start)
}

func appendBytes(dst, b []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(b)))
	return append(dst, b...)
}

func appendStr(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

func seal(dst []byte, start int) []byte {
	body := dst[start+recHeader:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(body)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(body, castagnoli))
	return dst
}

// decodeRecord decodes the record at the start of b and returns it with its
// total length. It never panics and never allocates more than the record's
// own (checksummed, bounded) length. A message's Payload is a slice of b
// (capacity cut to the payload): b must not be changed while it is used.
func decodeRecord(b []byte) (record, int, error) {
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
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[4:]) {
		return record{}, 0, fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	r, err := decodeBody(body)
	if err != nil {
		return record{}, 0, fmt.Errorf("%w: %v", errCorrupt, err)
	}
	return r, recHeader + int(n), nil
}

type reader struct {
	b   []byte
	err error
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

// str is the next field as a string (one copy).
func (r *reader) str() string { return string(r.field()) }

func decodeBody(body []byte) (record, error) {
	r := &reader{b: body}
	rec := record{kind: r.byte1()}
	switch rec.kind {
	case kindMsg:
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

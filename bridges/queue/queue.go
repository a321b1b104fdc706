// Package queue is Bastion's durable store-and-forward queue between the
// device transports and the upstream link. It owns the queue directory: a
// segmented append-only log of CRC-checked records.
//
// Accept returns only once a QoS 1 message is on disk (written and fsynced;
// concurrent Accepts share one fsync: group commit); AcceptAsync admits at
// once and reports the fsync on a channel, so that one caller can have many
// messages in the same group commit. Each segment is written full of zeros
// when it is started, so that a commit overwrites allocated blocks and its
// fsync has no inode or allocation to write (one I/O request fewer per
// commit); the zero tail reads back as the segment's clean end. A message
// leaves the
// queue only when the upstream link calls Ack after the broker's PUBACK.
// Messages are read back in the order they were accepted (by sequence
// number, also after compaction moved some: see compact.go), so order per
// device is kept. The queue is bounded by bytes on disk and by the age of the oldest
// message it holds; when either bound is reached Accept returns
// bridges.ErrQueueFull and nothing already held is dropped.
//
// The queue never talks to the network and never interprets payloads.
package queue

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/prometheus/client_golang/prometheus"
)

// Options bound and tune the queue. Zero values take the defaults.
type Options struct {
	// MaxBytes bounds the bytes of records on disk: every segment's,
	// delivered records included. Disk is freed from the front (a segment
	// is removed once it and every segment before it hold nothing
	// undelivered), so undelivered messages keep the segments after them
	// on disk and counted. Once the segments take half of MaxBytes, the
	// oldest segment's held messages are copied forward when that frees
	// four times their bytes (see compact); where it does not, the queue
	// can refuse for bytes with a few messages held (the refusal says how
	// many bytes are such delivered records). A compaction's copies count
	// on top until the old segment is removed. Default 64 MiB.
	// The active segment is preallocated to SegmentBytes and the next one
	// is prepared ahead (maybePrepareSpareLocked), so the files take at
	// most two SegmentBytes more.
	MaxBytes int64
	// MaxDeviceBytes bounds the bytes of one device's held messages
	// (admitted and not yet delivered or dropped), so that one device
	// cannot fill the queue and have every other device refused: above
	// it, that device's new messages are refused (bridges.ErrQueueFull,
	// reason device_share) while the others' are still taken. Default
	// MaxBytes/8 (at least eight devices must fill their share before
	// the queue is full for the rest), and never below one record of
	// MaxMessageBytes (a device can always queue its largest message).
	// MaxBytes or more: no bound of its own, only the queue's.
	MaxDeviceBytes int64
	// MaxAge bounds how old the oldest held message may be before new
	// messages are refused. Default 7 days.
	MaxAge time.Duration
	// SegmentBytes is the size at which a new segment file is started
	// (and to which it is preallocated). Default 4 MiB, or MaxBytes/4 if
	// that is smaller, so that a small MaxBytes (the gateway accepts 1 MiB)
	// still opens and its preallocation stays a quarter of it.
	SegmentBytes int64
	// MaxMessageBytes bounds one message (device + topic + payload).
	// Default 256 KiB.
	MaxMessageBytes int
	// AckFlushInterval is how long delivered-marks may wait in memory before
	// they are written (without fsync: losing them only causes duplicates).
	// Default 1s.
	AckFlushInterval time.Duration
	// Now is the clock for message ages; default time.Now.
	Now func() time.Time
	// readAt, if set (tests in this package), reads segment files (at open
	// and for Next) instead of the file itself: a disk that cannot read
	// some blocks.
	readAt func(f *os.File, b []byte, off int64) (int, error)
	// writeAt, if set (tests in this package), writes the batches and
	// delivered-marks instead of the file itself: a disk that fails writes.
	writeAt func(f *os.File, b []byte, off int64) (int, error)
	// readRetries, if set (tests in this package), replaces the pauses
	// before each new try of a block that failed to read at open.
	readRetries []time.Duration
	// resumeAfter, if set (tests in this package), replaces resumeFirst.
	resumeAfter time.Duration
	// noSpare (benchmarks in this package) turns off preparing the next
	// segment ahead: every rotation writes its own.
	noSpare bool
	// Sync makes a written batch durable; default fsync(2) (with a fast
	// disk and more than one P without the runtime's syscall entry, see
	// useRawSync; with one P submitted asynchronously, see defaultSync).
	// Tests set it to hold or fail the group commit's fsync.
	Sync func(f *os.File) error
}

func (o *Options) defaults() {
	if o.MaxBytes == 0 {
		o.MaxBytes = 64 << 20
	}
	if o.MaxAge == 0 {
		o.MaxAge = 7 * 24 * time.Hour
	}
	if o.SegmentBytes == 0 {
		o.SegmentBytes = min(4<<20, o.MaxBytes/4)
	}
	if o.MaxMessageBytes == 0 {
		o.MaxMessageBytes = 256 << 10
	}
	if o.AckFlushInterval == 0 {
		o.AckFlushInterval = time.Second
	}
	if o.MaxDeviceBytes == 0 {
		o.MaxDeviceBytes = max(o.MaxBytes/deviceShare, maxRecord(o.MaxMessageBytes))
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// ErrClosed is returned by calls on a closed queue.
var ErrClosed = errors.New("queue closed")

// ErrTooLarge is returned by Accept for a message above MaxMessageBytes.
var ErrTooLarge = errors.New("message too large for the queue")

// diskError marks a failed write or fsync as bridges.ErrDiskFailed, with
// err's text unchanged: the transports count the refusal as the disk's
// fault, apart from a full queue. Kept as q.failed, it marks every later
// refusal that wraps it too (a queue stopped after a failed write,
// rotation or fsync; one stopped by a full disk refuses with
// bridges.ErrQueueFull instead).
type diskError struct{ err error }

func (e diskError) Error() string   { return e.err.Error() }
func (e diskError) Unwrap() []error { return []error{e.err, bridges.ErrDiskFailed} }

// Entry is a held message and its sequence number (unique, increasing in
// acceptance order, never reused across restarts: see seqGap and
// writeFloor).
type Entry struct {
	Seq uint64
	bridges.Message
}

type segment struct {
	base uint64
	path string
	f    *os.File
	size int64
	// hdr is the header's length (segHeader, or segHeaderV1 for a segment
	// written before the salt); key its records' checksum key (see segKey).
	hdr int64
	key uint32
	// unverified: the header could not be read, so neither is the salt
	// that would tell its records from ones embedded in payloads: none is
	// taken, and the file is kept (not reclaimed) for an open after the
	// disk reads it again.
	unverified bool
	live       int // held (committed, unacked) messages in this segment
	// liveBytes is the bytes of their records: what compacting the
	// segment would copy forward (see compactPlanLocked).
	liveBytes int64
	// holes are byte ranges recover skipped (corrupt, or unreadable by the
	// disk): no read may cover them (see held).
	holes [][2]int64
	// marksUnsynced: delivered-marks were written here without an fsync
	// (the timer's flush), which SyncAcks syncs. Under mu.
	marksUnsynced bool
}

// inHole reports whether [from, to) overlaps one of the segment's holes.
func (s *segment) inHole(from, to int64) bool {
	for _, h := range s.holes {
		if from < h[1] && h[0] < to {
			return true
		}
	}
	return false
}

// entry is the in-memory index of one held message (48 bytes; the message
// itself stays on disk until read).
type entry struct {
	seq      uint64
	seg      *segment
	off      int64
	received int64 // Unix ns
	n        int32
	acked    bool
	dev      *deviceHeld // its device's count (see share.go)
}

// pending is an admitted message waiting for the writer; its record is
// batchBuf[off:off+n].
type pending struct {
	off, n int
	seq    uint64
	recv   int64       // Unix ns
	dev    *deviceHeld // counts n (see share.go)
	done   chan error  // Accept's and AcceptAsync's; nil for QoS 0
	fn     func(error) // AcceptNotify's, instead of done
}

// tell reports the batch's outcome to the message's Accept.
func (p *pending) tell(err error) {
	switch {
	case p.fn != nil:
		p.fn(err)
	case p.done != nil:
		p.done <- err
	}
}

// Queue is the durable queue. It implements bridges.Sink.
type Queue struct {
	dir  string
	opts Options
	log  *slog.Logger
	m    *metrics

	mu      sync.Mutex
	closed  bool
	failed  error // sticky write/fsync failure
	segs    []*segment
	ents    []entry // committed entries in seq order; acked ones trimmed from the head
	depth   int
	nextSeq uint64
	batch   []pending
	batchB  int64
	// batchBuf holds the records of batch, back to back. The writer takes
	// batch and batchBuf and leaves the previous ones (emptied) in their
	// place, so that admitting a message allocates nothing but its
	// durability channel.
	batchBuf   []byte
	spareBatch []pending
	spareBuf   []byte
	wbuf       []byte // the writer's: delivered-marks + the batch, written at once
	// writingB is the bytes of the batch being written: no longer in
	// batchB, not yet in its segment's size. Admission counts it, or a
	// message arriving during the write would see room that is taken.
	writingB int64
	acks     []uint64 // delivered marks not yet written
	// lastBatch is the size of the last commit's batch; gather, while the
	// writer waits for a batch to grow back to it, that size (admissions
	// below it do not wake the writer). See gatherWait.
	lastBatch, gather int
	fsyncEWMA         time.Duration // recent fsync time (moving average)
	// aio is the writer's asynchronous fsync (defaultSync), set up at its
	// first commit; noAIO once it is known not to work here. The writer
	// goroutine's only.
	aio   *aioFsync
	noAIO bool
	// unreadable holds when each held message the disk could not read
	// was first tried (see unreadableLocked).
	unreadable map[uint64]time.Time
	// strs holds the device ids and topics Next hands out (under mu).
	strs interner
	// devs holds each device's held bytes, for MaxDeviceBytes (see
	// share.go); devIdle is how many of them hold nothing. Under mu.
	devs    map[string]*deviceHeld
	devIdle int
	// lines spaces the log lines about refused devices.
	lines *ratelog.Every

	notify   chan struct{}
	wake     chan struct{}
	ackDue   chan struct{} // the delivered-marks timer fired (capacity 1)
	ackArmed bool          // that timer is running
	// ackRetry is the timer's pause after failed writes (zero: none
	// failed since the last write that succeeded): see ackRetryMax.
	ackRetry time.Duration
	// syncReq carries SyncAcks's requests to the writer, each with the
	// channel (capacity 1) for its outcome.
	syncReq chan chan error
	stop    chan struct{}
	stopped chan struct{}
	// resumeDue: time to try accepting again after a failed write,
	// rotation or fsync (capacity 1); resumeWait is the pause before the
	// next try.
	resumeDue  chan struct{}
	resumeWait time.Duration
	// compactDue asks the writer to see whether the head segment should
	// be compacted (capacity 1): a write (flush found one due), a refusal
	// for bytes, or a compaction after which another may be due. compactRetry: no compaction before
	// then after one failed (under mu).
	compactDue   chan struct{}
	compactRetry time.Time

	// spare is the next segment, zeroed and synced ahead of the rotation
	// (maybePrepareSpareLocked), nil until ready; preparing while that
	// runs; spareRetry: no new try before then after a failure. Under mu.
	// spareWG: Close waits for the preparation.
	spare      *os.File
	spareKey   uint32 // spare's checksum key
	preparing  bool
	spareRetry time.Time
	spareWG    sync.WaitGroup

	// creating, if set (tests in this package, before anything that
	// rotates), runs while a new segment is written, before its sync.
	creating func(f *os.File)
	// gatherFor, if set (tests in this package, under mu), replaces
	// gatherWait's bound.
	gatherFor time.Duration
	// compacting, if set (tests in this package), runs at each step of a
	// compaction (see compact), with the segment written to and where:
	// a test takes its crash images there.
	compacting func(step compactStep, seg *segment, off, n int64)
}

var _ bridges.NotifySink = (*Queue)(nil)

// Open opens (creating if needed) the queue in dir, recovers every message
// whose Accept returned, cuts any torn tail, and starts the writer. Metrics
// are registered on reg (nil: not exported).
func Open(dir string, opts Options, log *slog.Logger, reg prometheus.Registerer) (*Queue, error) {
	if opts.MaxBytes < 0 || opts.MaxDeviceBytes < 0 || opts.MaxAge < 0 || opts.SegmentBytes < 0 || opts.MaxMessageBytes < 0 || opts.AckFlushInterval < 0 {
		return nil, fmt.Errorf("open queue %s: negative option in %+v", dir, opts)
	}
	opts.defaults()
	if opts.SegmentBytes > opts.MaxBytes {
		return nil, fmt.Errorf("open queue %s: SegmentBytes %d above MaxBytes %d", dir, opts.SegmentBytes, opts.MaxBytes)
	}
	// A larger message would be written and acknowledged, then fail to
	// decode: dropped at its first read, cut or skipped at the next open.
	if limit := maxRecBody - msgOverhead; opts.MaxMessageBytes > limit {
		return nil, fmt.Errorf("open queue %s: MaxMessageBytes %d above the record format's limit of %d; lower it", dir, opts.MaxMessageBytes, limit)
	}
	// A device could not queue its largest message.
	if least := maxRecord(opts.MaxMessageBytes); opts.MaxDeviceBytes < least {
		return nil, fmt.Errorf("open queue %s: MaxDeviceBytes %d below the record of one message of MaxMessageBytes (%d bytes); raise it", dir, opts.MaxDeviceBytes, least)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open queue: create %s: %w", dir, err)
	}
	q := &Queue{
		dir: dir, opts: opts, log: log.With("component", "queue"), lines: ratelog.New(time.Minute),
		notify: make(chan struct{}), wake: make(chan struct{}, 1), ackDue: make(chan struct{}, 1),
		resumeDue: make(chan struct{}, 1), compactDue: make(chan struct{}, 1), syncReq: make(chan chan error),
		stop: make(chan struct{}), stopped: make(chan struct{}),
	}
	q.m = newMetrics(q)
	if err := q.recover(); err != nil {
		q.closeFiles()
		return nil, err
	}
	if reg != nil {
		if err := q.m.register(reg); err != nil {
			q.closeFiles()
			return nil, fmt.Errorf("open queue %s: register metrics: %w", dir, err)
		}
	}
	q.m.depth.Set(float64(q.depth))
	q.m.bytes.Set(float64(q.diskBytes()))
	go q.writer()
	return q, nil
}

// recover loads every segment, skipping corrupt or unreadable bytes that
// valid messages follow and cutting torn tails (see the comments inside).
func (q *Queue) recover() error {
	// A spare left by a crash or a failed preparation holds no message.
	if err := os.Remove(filepath.Join(q.dir, spareName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open queue: remove the unused prepared segment: %w", err)
	}
	names, err := filepath.Glob(filepath.Join(q.dir, "*.seg"))
	if err != nil {
		return fmt.Errorf("open queue %s: list segments: %w", q.dir, err)
	}
	sort.Strings(names)
	floor, floorNames, err := q.readFloor()
	if err != nil {
		return err
	}
	acked := map[uint64]bool{}
	devs := map[string]*deviceHeld{} // see installDevices
	var lastSeq uint64
	var moved []entry // kindMoved records, in the order read
	newSeg := false   // commits need a new segment (the last one's header is unreadable)
	bases := make([]uint64, len(names))
	for i, name := range names {
		if _, err := fmt.Sscanf(filepath.Base(name), "%020d.seg", &bases[i]); err != nil {
			return fmt.Errorf("open queue: segment name %s: not <20 digits>.seg; move the file away", name)
		}
	}
	// Which segment is the last one is decided on the segments that stay:
	// newer ones whose creation was cut (a crash during a rotation or
	// resume) are removed first. The last one is where commits go unless
	// its header calls for a new segment (see newSeg); taken for an
	// earlier one, a v1 segment or one with an unreadable header before a
	// torn creation got the commits, unkeyed (and in the unreadable case,
	// cut at the next open that read its salt: acknowledged messages
	// lost). Most segments' header is whole, read alone; a file without
	// one is read whole once, here, and kept for the loop below.
	var tail []byte // names[len(names)-1] as read here (haveTail)
	var tailBad [][2]int64
	haveTail := false
	for len(names) > 0 && !q.headerWhole(names[len(names)-1]) {
		name := names[len(names)-1]
		data, bad, err := q.readSegment(name)
		if err != nil {
			return fmt.Errorf("open queue: read segment %s: %w", name, err)
		}
		if !tornSegment(data, bad) {
			tail, tailBad, haveTail = data, bad, true
			break
		}
		if err := q.removeTorn(name, len(data)); err != nil {
			return err
		}
		names, bases = names[:len(names)-1], bases[:len(bases)-1]
	}
	for i, name := range names {
		last := i == len(names)-1
		base := bases[i]
		var data []byte
		var bad [][2]int64
		if last && haveTail {
			data, bad = tail, tailBad
		} else if data, bad, err = q.readSegment(name); err != nil {
			return fmt.Errorf("open queue: read segment %s: %w", name, err)
		}
		for _, r := range bad {
			q.m.unreadable.Add(float64(r[1] - r[0]))
			q.log.Error("queue segment has blocks the disk cannot read (the disk is failing); the messages in them are lost, the rest are kept",
				"segment", name, "from", r[0], "to", r[1], "err", syscall.EIO)
		}
		// A header the disk cannot read came back as zeros: that is not a
		// torn creation (which would remove a segment holding acknowledged
		// messages) nor a foreign file; without its salt, its records are
		// not taken (see unverified).
		headerBad := len(bad) > 0 && bad[0][0] < int64(segHeader)
		hdr, key, ok := parseSegHeader(data)
		if !headerBad && !ok {
			if tornSegment(data, bad) {
				// Only the newest can be (removed above); kept for a
				// directory where one is followed by others.
				if err := q.removeTorn(name, len(data)); err != nil {
					return err
				}
				continue
			}
			return fmt.Errorf("open queue: %s is not a queue segment (bad magic); move it away", name)
		}
		if headerBad && last {
			// A commit's write into the unreadable block would need to read
			// it first and fail, batch after batch.
			newSeg = true
		}
		if hdr == segHeaderV1 && last {
			// Written before the salt: commits appended to it would be
			// records a device could forge (see segMagic).
			newSeg = true
		}
		f, err := os.OpenFile(name, os.O_RDWR, 0o600)
		if err != nil {
			return fmt.Errorf("open queue: open segment %s: %w", name, err)
		}
		seg := &segment{base: base, path: name, f: f, holes: bad, hdr: int64(hdr), key: key}
		q.segs = append(q.segs, seg)
		if headerBad {
			q.log.Error("queue segment's header cannot be read (the disk is failing): its records cannot be told from ones a device embedded in a payload, so none is taken; the file is kept for an open after the disk reads it again",
				"segment", name, "bytes", len(data))
			seg.unverified, seg.size = true, int64(len(data))
			q.nextSeq = max(q.nextSeq, base)
			continue
		}
		off := hdr
		for off < len(data) {
			rec, n, err := decodeRecordIn(data[off:], key, nil)
			if err == nil && seg.inHole(int64(off), int64(off+n)) {
				// Decoded only because the bytes the disk could not read
				// were zeros in the record too: it cannot be read later.
				err = fmt.Errorf("%w: in a block the disk cannot read", errCorrupt)
			}
			if err == nil && rec.kind == kindMsg && rec.seq >= seqCeiling {
				// Not the queue's: the next of a chain of records a device
				// embedded in its payload, after resync took the first.
				err = fmt.Errorf("%w: seq %d above any the queue gives out", errCorrupt, rec.seq)
			}
			if err == nil && rec.kind == kindMoved && (key == 0 || rec.seq >= base || rec.seq >= seqCeiling) {
				// Compaction writes moved records to keyed segments only,
				// each below its segment's base (it was in an older one):
				// in an unkeyed segment it is one a device embedded in its
				// payload.
				err = fmt.Errorf("%w: moved record for seq %d not the queue's (segment base %d, keyed %t)", errCorrupt, rec.seq, base, key != 0)
			}
			if err != nil && allZero(data[off:]) {
				// The preallocated rest of the segment: its clean end (no
				// record starts with a zero length). An unreadable block
				// there is rewritten by later commits: no longer a hole.
				seg.holes = slices.DeleteFunc(seg.holes, func(h [2]int64) bool { return h[0] >= int64(off) })
				data = data[:off]
				break
			}
			if err != nil {
				// A bad record followed by a valid message record (one
				// with a higher seq than every message before it) is
				// skipped, not cut at: only the damaged bytes are lost.
				//
				// A segment before the last was complete and synced before
				// the next one was started (the writer starts one only for
				// a batch after the previous commit's fsync), so a bad
				// record in it is the disk's corruption, not a torn write,
				// and every message after it was acknowledged to its
				// device. The same when the disk could not read some of the
				// segment: that is not a torn write either.
				//
				// In the last segment a torn write can only damage the
				// batch written after the last fsync that returned, and its
				// bytes may land out of order (a later sector of the batch
				// on disk, an earlier one not: zeros or garbage, then valid
				// records). So a valid record after the bad bytes is either
				// acknowledged (the bad bytes are the disk's corruption and
				// cutting would lose everything after them: with 4 MiB
				// segments the last one usually holds most of the backlog)
				// or part of that unacknowledged batch. Keeping it costs at
				// most a duplicate upstream, after the device's resend of
				// what was not acknowledged (which then also comes after
				// it, not before); cutting it may lose acknowledged
				// messages. A torn tail that nothing valid follows (half a
				// record, a header, garbage, then zeros or the file's end)
				// is still cut below.
				//
				// The last segment has no next base to bound the seqs
				// from above: its records go up to the last seq the
				// writer gave out, and every open moves that on by
				// seqGap, so any seq above lastSeq may be there.
				before := uint64(math.MaxUint64)
				if !last {
					before = bases[i+1]
				}
				if next := resync(data, key, off+1, lastSeq, before, base, q.opts.MaxMessageBytes); next > 0 {
					q.m.skipped.Inc()
					seg.holes = append(seg.holes, [2]int64{int64(off), int64(next)})
					why := "the disk's corruption, not a torn write"
					if last && len(bad) == 0 {
						why = "the disk's corruption, or a torn write of the last, unacknowledged batch that reached the disk out of order"
					}
					q.log.Error("skipping corrupt or unreadable bytes in a queue segment ("+why+"); the messages after them are kept",
						"segment", name, "offset", off, "bytes_skipped", next-off, "err", err,
						"last_good_seq", lastSeq, "lost_seqs_at_most", lostAtMost(data[next:], key, lastSeq))
					off = next
					continue
				}
			}
			if err != nil {
				q.m.cut.Inc()
				lvl := slog.LevelWarn
				if !last || !errors.Is(err, errShort) {
					lvl = slog.LevelError
				}
				q.log.Log(context.Background(), lvl, "cutting queue segment at a bad record (torn write after a crash, or disk corruption)",
					"segment", name, "offset", off, "bytes_cut", len(data)-off, "err", err)
				if err := f.Truncate(int64(off)); err != nil {
					return fmt.Errorf("open queue: truncate %s at %d: %w", name, off, err)
				}
				if err := f.Sync(); err != nil {
					return fmt.Errorf("open queue: sync %s after truncate: %w", name, err)
				}
				// What is cut is rewritten by later commits, readable or
				// not: a write that fails there is refused as any other.
				seg.holes = slices.DeleteFunc(seg.holes, func(h [2]int64) bool { return h[0] >= int64(off) })
				data = data[:off]
				break
			}
			switch rec.kind {
			case kindMsg:
				if rec.seq > lastSeq {
					q.ents = append(q.ents, entry{seq: rec.seq, seg: seg, off: int64(off), n: int32(n), received: rec.msg.Received.UnixNano(), dev: recoveredDevice(devs, rec.msg.Device)})
					lastSeq = rec.seq
				}
			case kindMoved:
				// Its seq is below the last one taken: kept apart and
				// merged by seq below, a later copy (moved again, or
				// the original still there after a crash before its
				// segment was removed) replacing an earlier one.
				moved = append(moved, entry{seq: rec.seq, seg: seg, off: int64(off), n: int32(n), received: rec.msg.Received.UnixNano(), dev: recoveredDevice(devs, rec.msg.Device)})
			case kindAck:
				for _, s := range rec.acks {
					acked[s] = true
				}
			}
			off += n
		}
		seg.size = int64(len(data))
		q.nextSeq = max(q.nextSeq, base, lastSeq+1)
	}
	q.ents = mergeMoved(q.ents, moved)
	kept := q.ents[:0]
	for _, e := range q.ents {
		if !acked[e.seq] {
			e.seg.live++
			e.seg.liveBytes += int64(e.n)
			e.dev.bytes += int64(e.n)
			kept = append(kept, e)
		}
	}
	q.ents = kept
	q.installDevices(devs)
	q.depth = len(kept)
	if len(q.segs) > 0 {
		// A crash may have lost the last batch after it was written but
		// before its fsync returned, and the link may have sent it
		// upstream meanwhile: its sequence numbers are in the cloud though
		// not on disk. Reusing them for new messages would make a cloud
		// that drops duplicates by bastion-origin and bastion-seq drop an
		// acknowledged message. So every open skips past any sequence
		// number that batch can have held.
		// (Saturating: a segment name near 2^64 must not wrap it back to
		// numbers already given out; the check below refuses it.)
		q.nextSeq += min(seqGap(q.opts.MaxBytes), math.MaxUint64-q.nextSeq)
	}
	// The gap above covers a lost batch that followed a durable one. The
	// first batch after an open follows the gap instead, so if it is lost
	// the disk shows nothing past the last seq of the run before and the
	// next open would compute this open's nextSeq again: the floor this
	// open wrote, before it gave out any number, is past that batch.
	q.nextSeq = max(q.nextSeq, floor, 1)
	// Recover takes no message record at or above seqCeiling (resync's
	// guard against records embedded in payloads), so a number this open
	// or the next could give out there would be cut or skipped at the next
	// open: acknowledged messages lost.
	if gap := seqGap(q.opts.MaxBytes); 2*gap >= seqCeiling || q.nextSeq >= seqCeiling-2*gap {
		return fmt.Errorf("open queue %s: next sequence number %d is too close to %d, above which recovery drops message records, to skip past a lost batch (only a damaged or forged segment name or %s file holds such a number); move the queue directory away (the messages it holds are then lost)", q.dir, q.nextSeq, uint64(seqCeiling), floorPrefix+"*")
	}
	if err := q.writeFloor(floorNames, q.nextSeq+seqGap(q.opts.MaxBytes)); err != nil {
		return err
	}
	if len(q.segs) == 0 || newSeg {
		seg, err := q.createSegment(q.nextSeq)
		if err != nil {
			return err
		}
		q.segs = append(q.segs, seg)
	}
	q.reclaim()
	q.log.Info("queue opened", "dir", q.dir, "held", q.depth, "segments", len(q.segs), "next_seq", q.nextSeq)
	return nil
}

// headerWhole reports whether the segment file name starts with a whole
// header (v2 or v1), reading only that (through opts.readAt). Any failure
// reports false: readSegment then reads it whole and tells why.
func (q *Queue) headerWhole(name string) bool {
	f, err := os.Open(name)
	if err != nil {
		return false
	}
	defer f.Close()
	readAt := q.opts.readAt
	if readAt == nil {
		readAt = (*os.File).ReadAt
	}
	b := make([]byte, segHeader)
	n, err := readAt(f, b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return false
	}
	_, _, ok := parseSegHeader(b[:n])
	return ok
}

// tornSegment reports whether a segment read as data, with the ranges bad
// the disk could not read, is one whose creation was cut before its first
// sync (see tornCreation): it never held a message. One with unreadable
// blocks is not (zeros the disk made up).
func tornSegment(data []byte, bad [][2]int64) bool {
	_, _, ok := parseSegHeader(data)
	return !ok && len(bad) == 0 && tornCreation(data)
}

// removeTorn removes the segment name of n bytes, whose creation was cut
// (tornSegment).
func (q *Queue) removeTorn(name string, n int) error {
	q.log.Warn("removing segment cut during creation", "segment", name, "bytes", n)
	if err := os.Remove(name); err != nil {
		return fmt.Errorf("open queue: remove empty segment %s: %w", name, err)
	}
	return nil
}

// seqGap is how far Open moves the next sequence number past the last one
// on disk: more than one batch can hold. The writer writes one batch at a
// time and the next only after the previous one's fsync, so at most one
// written batch is not on disk after a crash; it holds at most MaxBytes
// bytes (admission counts it) and a record takes at least one byte. 2^32
// covers a MaxBytes lowered across the crash from up to 4 GiB; uint64
// sequence numbers last 2^32 opens.
func seqGap(maxBytes int64) uint64 { return max(1<<32, uint64(maxBytes)) }

// floorPrefix names the file whose name ends in the lowest sequence number
// an open may give out (20 digits). Each open renames it past what its
// first batch can hold (writeFloor). The value is in the name, not in the
// file, so that moving it costs a rename and one directory sync, no data
// block, and a torn write cannot damage it. "*.seg" does not match it.
const floorPrefix = "seqfloor."

// readFloor returns the floor the last open wrote (0 if none: a new queue,
// or one written before the floor existed) and the names holding it.
func (q *Queue) readFloor() (uint64, []string, error) {
	names, err := filepath.Glob(filepath.Join(q.dir, floorPrefix+"*"))
	if err != nil {
		return 0, nil, fmt.Errorf("open queue %s: list sequence floor: %w", q.dir, err)
	}
	var floor uint64
	for _, name := range names {
		var v uint64
		if _, err := fmt.Sscanf(filepath.Base(name), floorPrefix+"%020d", &v); err != nil || filepath.Base(name) != fmt.Sprintf(floorPrefix+"%020d", v) {
			return 0, nil, fmt.Errorf("open queue: sequence floor name %s: not %s<20 digits>; move the file away", name, floorPrefix)
		}
		floor = max(floor, v)
	}
	return floor, names, nil
}

// writeFloor makes v the durable floor before any sequence number is given
// out: old (readFloor's names) is renamed to it, or a new empty file made,
// and the directory synced.
func (q *Queue) writeFloor(old []string, v uint64) error {
	name := filepath.Join(q.dir, fmt.Sprintf(floorPrefix+"%020d", v))
	if len(old) > 0 {
		if err := os.Rename(old[len(old)-1], name); err != nil {
			return fmt.Errorf("open queue: move the sequence floor to %s: %w", name, err)
		}
		for _, o := range old[:len(old)-1] {
			if err := os.Remove(o); err != nil {
				return fmt.Errorf("open queue: remove the old sequence floor %s: %w", o, err)
			}
		}
	} else {
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("open queue: create the sequence floor %s: %w", name, err)
		}
		f.Close()
	}
	if err := syncDir(q.dir); err != nil {
		return fmt.Errorf("open queue: make the sequence floor durable: %w", err)
	}
	q.m.fsyncs.Inc()
	return nil
}

// readSegment reads the segment file name whole. A block the disk cannot
// read (EIO: a failing SD card or eMMC) comes back as zeros and its range in
// bad, so that the messages around it are kept (recover skips the zeros as
// it skips corrupt bytes) instead of the gateway refusing to start.
func (q *Queue) readSegment(name string) (data []byte, bad [][2]int64, err error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	readAt := q.opts.readAt
	if readAt == nil {
		readAt = (*os.File).ReadAt
	}
	retries := q.opts.readRetries
	if retries == nil {
		retries = []time.Duration{100 * time.Millisecond, 500 * time.Millisecond, time.Second}
	}
	// The pauses of a segment's retries together are bounded (5 s; 80 s
	// for a full 64 MiB queue of 4 MiB segments), so that a disk with many
	// bad blocks holds the gateway's start for seconds, not hours.
	budget := 5 * time.Second
	data = make([]byte, fi.Size())
	const chunk, block = 1 << 20, 4 << 10
	for off := int64(0); off < int64(len(data)); off += chunk {
		b := data[off:min(off+chunk, int64(len(data)))]
		if _, err := readAt(f, b, off); err == nil || errors.Is(err, io.EOF) {
			continue
		} else if !errors.Is(err, syscall.EIO) {
			return nil, nil, err
		}
		// Find the unreadable blocks one by one, each tried again after
		// a pause or two: a card reader's glitch at boot loses nothing.
		for bo := int64(0); bo < int64(len(b)); bo += block {
			bb := b[bo:min(bo+block, int64(len(b)))]
			_, err := readAt(f, bb, off+bo)
			for _, d := range retries {
				if !errors.Is(err, syscall.EIO) || budget < d {
					break
				}
				budget -= d
				time.Sleep(d)
				_, err = readAt(f, bb, off+bo)
			}
			switch {
			case err == nil || errors.Is(err, io.EOF):
			case errors.Is(err, syscall.EIO):
				clear(bb)
				if n := len(bad); n > 0 && bad[n-1][1] == off+bo {
					bad[n-1][1] += int64(len(bb))
				} else {
					bad = append(bad, [2]int64{off + bo, off + bo + int64(len(bb))})
				}
			default:
				return nil, nil, err
			}
		}
	}
	return data, bad, nil
}

// createSegment makes a new segment, durably, for the caller to append to
// q.segs. It takes no lock: admissions go on while it writes.
// The segment is written full of zeros up to SegmentBytes first, so that a
// commit later overwrites blocks that are already allocated and written and
// leaves the file's size alone: its fsync then writes the data and flushes
// the disk's cache, without also writing the inode (and the block
// allocation) as an append does. On this benchmark's disk that is one I/O
// request fewer per commit (BenchmarkCommitSync: 0.55-0.7x the latency,
// -30 % of the CPU); on flash, one page write fewer per commit, against
// writing each segment's zeros once. recover reads the zero tail as the
// segment's clean end.
func (q *Queue) createSegment(base uint64) (*segment, error) {
	name := segName(q.dir, base)
	f, key, err := q.zeroedFile(name, 0)
	if err != nil {
		return nil, err
	}
	if err := syncDir(q.dir); err != nil {
		// Removed, or the next try (resume's, with the same base) would
		// find the name taken and fail for good.
		f.Close()
		os.Remove(name)
		return nil, err
	}
	q.m.fsyncs.Add(2)
	return &segment{base: base, path: name, f: f, size: int64(segHeader), hdr: int64(segHeader), key: key}, nil
}

func segName(dir string, base uint64) string {
	return filepath.Join(dir, fmt.Sprintf("%020d.seg", base))
}

// zeroedFile creates name (which must not exist) holding a new segment
// header and zeros up to SegmentBytes, and syncs it (not its directory).
// It returns the file and the segment's checksum key. On
// failure the file is removed: it holds no message, and a later try with
// the same name (resume's, whose base does not move while it refuses)
// would fail on it for good.
func (q *Queue) zeroedFile(name string, writebackEvery int64) (*os.File, uint32, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("queue: create segment %s: %w", name, err)
	}
	fail := func(err error) (*os.File, uint32, error) {
		f.Close()
		os.Remove(name)
		return nil, 0, err
	}
	hdr, key := newSegHeader()
	if _, err := f.Write(hdr); err != nil {
		return fail(fmt.Errorf("queue: write segment header %s: %w", name, err))
	}
	if err := zeroFill(f, int64(segHeader), q.opts.SegmentBytes, writebackEvery); err != nil {
		// Best effort: without the zeros commits append (slower, same
		// durability). A full disk is refused by the batch's own write.
		q.log.Warn("queue: could not preallocate segment; commits will append", "segment", name, "err", err)
		if err := f.Truncate(int64(segHeader)); err != nil {
			return fail(fmt.Errorf("queue: truncate segment %s after a failed preallocation: %w", name, err))
		}
	}
	if q.creating != nil {
		q.creating(f)
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("queue: sync new segment %s: %w", name, err))
	}
	return f, key, nil
}

// spareName is the next segment while it is prepared and waits
// (prepareSpare); the "*.seg" that recover reads does not match it.
const spareName = "next.seg.spare"

// spareWriteback: the spare's zeros are handed to the disk in pieces of
// this size as they are written, so that its sync has little left to
// write. A commit's fsync that comes during that sync can wait for it
// (ext4's ordered mode writes a journal transaction's newly allocated data
// blocks before committing it): 400 ms for a whole segment on a card that
// writes 10 MB/s, by arithmetic (no card was measured). On the development
// VM's quick disk it makes no
// difference: BenchmarkRotation's slowest Accept was 4.3-5.9 ms with
// every rotation writing its segment, 2.4-4.1 with the spare synced whole
// (2 rotations a round; the others 4)
// and 2.5-4.2 written back in pieces (syncing every piece: 1.8-2.7, but
// the p99 twice as long, every commit meanwhile waiting for a cache flush).
const spareWriteback = 256 << 10

// spareAt is how full the active segment is (a fraction of SegmentBytes)
// when the next one starts being prepared.
const spareAt = 0.5

// spareRetryAfter is the pause before another try after a spare could not
// be prepared (rotations make their segment themselves meanwhile).
const spareRetryAfter = time.Minute

// maybePrepareSpareLocked starts preparing the next segment once the
// active one, seg, is half full. Writing SegmentBytes of zeros and syncing
// them takes milliseconds on a quick disk and can take hundreds on an SD
// card; done at the rotation, every device's acknowledgement would wait
// for it. Caller holds q.mu.
func (q *Queue) maybePrepareSpareLocked(seg *segment) {
	if q.spare != nil || q.preparing || q.closed || q.opts.noSpare || float64(seg.size) < spareAt*float64(q.opts.SegmentBytes) ||
		q.opts.Now().Before(q.spareRetry) {
		return
	}
	q.preparing = true
	q.spareWG.Add(1)
	go q.prepareSpare()
}

// prepareSpare writes the next segment, zeroed and synced, under
// spareName, for rotate to rename.
func (q *Queue) prepareSpare() {
	defer q.spareWG.Done()
	name := filepath.Join(q.dir, spareName)
	if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		q.spareFailed(fmt.Errorf("queue: remove stale %s: %w", name, err))
		return
	}
	f, key, err := q.zeroedFile(name, spareWriteback)
	if err != nil {
		q.spareFailed(err)
		return
	}
	q.m.fsyncs.Inc()
	q.mu.Lock()
	q.preparing = false
	if q.closed {
		q.mu.Unlock()
		f.Close()
		os.Remove(name)
		return
	}
	q.spare, q.spareKey = f, key
	q.mu.Unlock()
}

func (q *Queue) spareFailed(err error) {
	q.log.Warn("queue: could not prepare the next segment ahead; the rotation will make it (devices wait for that commit)",
		"err", err, "retry_in", spareRetryAfter)
	os.Remove(filepath.Join(q.dir, spareName))
	q.mu.Lock()
	q.preparing = false
	q.spareRetry = q.opts.Now().Add(spareRetryAfter)
	q.mu.Unlock()
}

// rotate makes the segment that starts at base: the prepared spare,
// renamed (a rename and a directory sync), or, with none ready, a new one
// written now. The writer goroutine only.
func (q *Queue) rotate(base uint64) (*segment, error) {
	q.mu.Lock()
	f, key := q.spare, q.spareKey
	q.spare = nil
	q.mu.Unlock()
	if f == nil {
		return q.createSegment(base)
	}
	name := segName(q.dir, base)
	// rename replaces an existing file: a segment of that name (whose later
	// reclaim would unlink this one) is refused, as createSegment's
	// O_EXCL refuses it. Only this goroutine makes segment names.
	if _, err := os.Lstat(name); !errors.Is(err, os.ErrNotExist) {
		if err == nil {
			err = os.ErrExist
		}
		q.mu.Lock()
		if q.spare == nil && !q.closed {
			q.spare, q.spareKey = f, key
			f = nil
		}
		q.mu.Unlock()
		if f != nil {
			f.Close()
			os.Remove(f.Name())
		}
		return nil, fmt.Errorf("queue: start segment %s: %w; not replacing it (removing it later would unlink the new one)", name, err)
	}
	if err := os.Rename(f.Name(), name); err != nil {
		f.Close()
		os.Remove(f.Name())
		q.log.Warn("queue: could not use the prepared segment; making one now", "err", err)
		return q.createSegment(base)
	}
	if err := syncDir(q.dir); err != nil {
		f.Close()
		os.Remove(name) // holds no message; see createSegment
		return nil, err
	}
	q.m.fsyncs.Inc()
	// Opened again under its new name, which errors about it then name
	// (an os.File keeps the name it was opened with).
	if nf, err := os.OpenFile(name, os.O_RDWR, 0o600); err == nil {
		f.Close()
		f = nf
	}
	return &segment{base: base, path: name, f: f, size: int64(segHeader), hdr: int64(segHeader), key: key}, nil
}

// zeroBlock is what zeroFill writes (never changed).
var zeroBlock [64 << 10]byte

// zeroFill writes zeros to f from off to end, starting the write-back
// (without waiting) of every writebackEvery bytes (0: never).
func zeroFill(f *os.File, off, end, writebackEvery int64) error {
	var since int64
	for off < end {
		n := min(int64(len(zeroBlock)), end-off)
		if _, err := f.WriteAt(zeroBlock[:n], off); err != nil {
			return err
		}
		off += n
		if since += n; writebackEvery > 0 && since >= writebackEvery && off < end {
			startWriteback(f, off-since, since)
			since = 0
		}
	}
	return nil
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// tornCreation reports whether a segment without a complete header is one
// whose creation was cut before its first sync: a prefix of the magic (of
// either version: one may have been cut by the crash before an upgrade),
// or (the header's sector never written) the magic's place still zero, and
// zeros after; or the whole magic with the file ending inside the salt.
// Such a segment never held a message: messages are written only after the
// creation was synced.
func tornCreation(data []byte) bool {
	if len(data) < segHeader && strings.HasPrefix(string(data), segMagic) {
		return true
	}
	n := min(len(data), len(segMagic))
	head := string(bytes.TrimRight(data[:n], "\x00")) // the magic has no zero byte
	return (strings.HasPrefix(segMagic, head) || strings.HasPrefix(segMagicV1, head)) && allZero(data[n:])
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("queue: open dir %s for sync: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("queue: sync dir %s: %w", dir, err)
	}
	return nil
}

// reclaim trims delivered entries and removes fully delivered segments,
// oldest first (so ack records for older segments are never needed again),
// stepping over unverified ones (see below). Caller holds q.mu.
func (q *Queue) reclaim() {
	i := 0
	for i < len(q.ents) && q.ents[i].acked {
		i++
	}
	if i > 0 {
		if n := len(q.ents) - i; n <= i || n <= 64 {
			// Few held behind the delivered ones (the usual case: the link
			// keeps up): move them to the front, so that the array is used
			// again instead of being sliced away at the head and grown anew
			// by the writer's appends (66 bytes per message in the 50-device
			// profile). At most as many moved as were removed, or 64.
			copy(q.ents, q.ents[i:])
			clear(q.ents[n:]) // no segment kept alive by a stale copy
			q.ents = q.ents[:n]
		} else {
			q.ents = q.ents[i:]
			if cap(q.ents) > 1024 && len(q.ents) < cap(q.ents)/4 {
				q.ents = append([]entry(nil), q.ents...)
			}
		}
	}
	// A segment's delivered-marks may be for messages in the segments
	// before it, so none is removed while one before it still holds a
	// message: those marks would be lost and the messages sent again
	// after a restart. An unverified segment is stepped over, not stopped
	// at: none of its messages is held (recover took none), so nothing
	// waits for its marks, and stopping there kept every segment after it
	// until the queue was full by bytes and refused every message, at
	// every later open too. It is itself kept, never removed (the last
	// copy of its messages): once an open reads it again its messages
	// come back, and those delivered before, whose marks went with the
	// segments removed here, are sent again under their own seqs:
	// duplicates the cloud drops by bastion-origin and bastion-seq. (So
	// would records of a batch whose write failed there, refused, whose
	// marks went too: see flush; that the disk fails both ways in the
	// one segment is not guarded against.)
	for i := 0; i < len(q.segs)-1; {
		s := q.segs[i]
		if s.unverified {
			i++
			continue
		}
		if s.live > 0 {
			return
		}
		s.f.Close()
		if err := os.Remove(s.path); err != nil {
			q.log.Error("removing delivered segment failed; will retry", "segment", s.path, "err", err)
			return
		}
		q.segs = slices.Delete(q.segs, i, i+1)
		if q.failed != nil && errors.Is(q.failed, syscall.ENOSPC) {
			// Stopped by a full disk, which this made room on: try now
			// rather than after a pause of up to resumeMax.
			signal(q.resumeDue)
		}
	}
}

// unverifiedLocked returns the bytes of the unverified segments, which
// count against MaxBytes (they are on disk) though no delivery frees them,
// and their paths. Caller holds q.mu.
func (q *Queue) unverifiedLocked() (n int64, paths []string) {
	for _, s := range q.segs {
		if s.unverified {
			n += s.size
			paths = append(paths, s.path)
		}
	}
	return n, paths
}

// keptBehindLocked returns the bytes of the segments reclaim keeps only
// because a segment before them still holds a message: every record in
// them is delivered, yet they count against MaxBytes. oldest is the oldest
// held message, the one keeping them. Caller holds q.mu.
func (q *Queue) keptBehindLocked() (n int64, oldest entry) {
	i := 0
	for i < len(q.ents) && q.ents[i].acked {
		i++
	}
	if i == len(q.ents) {
		return 0, entry{}
	}
	oldest = q.ents[i]
	behind := false
	for _, s := range q.segs[:len(q.segs)-1] { // the last is being written
		switch {
		case s.unverified:
		case s.live > 0:
			behind = true
		case behind:
			n += s.size
		}
	}
	return n, oldest
}

func (q *Queue) diskBytes() int64 {
	var n int64
	for _, s := range q.segs {
		n += s.size
	}
	return n
}

// Accept holds m. For QoS 1 it returns once m is durably on disk; for QoS 0
// once it is in the next write batch. It returns bridges.ErrQueueFull when the
// queue is at its byte or age bound.
func (q *Queue) Accept(ctx context.Context, m bridges.Message) error {
	done, err := q.admit(m, nil)
	if err != nil || done == nil {
		return err
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		// It may still be written (and then delivered): at least once.
		return fmt.Errorf("queue accept from %s: waiting for disk: %w", m.Device, ctx.Err())
	}
}

// AcceptAsync makes every decision Accept makes (full by bytes or age, too
// large, closed, stopped after a disk error) and returns without waiting for
// the disk. For QoS 1 the channel then receives exactly one value: nil once
// the group commit that covers m has been fsynced, or the error Accept would
// have returned. For QoS 0 the channel is nil. ctx is not used: admission
// never blocks.
func (q *Queue) AcceptAsync(_ context.Context, m bridges.Message) (<-chan error, error) {
	return q.admit(m, nil)
}

// AcceptNotify is AcceptAsync with the outcome reported by calling fn
// (bridges.NotifySink): for QoS 1 fn is called exactly once, on the queue's
// writer goroutine, right after the fsync of the group commit covering m
// (or with the error AcceptAsync's channel would carry), in acceptance
// order; the next commit waits while fn runs. No channel is made.
func (q *Queue) AcceptNotify(_ context.Context, m bridges.Message, fn func(error)) (pending bool, err error) {
	if m.QoS == 0 {
		fn = nil
	}
	done, err := q.admit(m, fn)
	return err == nil && (done != nil || fn != nil), err
}

// admit checks the bounds and adds m to the next batch. For QoS 1 the
// outcome goes to fn if set, else to the returned channel; done is nil for
// QoS 0 and with fn.
func (q *Queue) admit(m bridges.Message, fn func(error)) (chan error, error) {
	if m.Received.IsZero() {
		m.Received = q.opts.Now()
	}
	if n := len(m.Device) + len(m.Topic) + len(m.Payload); n > q.opts.MaxMessageBytes {
		q.m.refused.WithLabelValues("too_large").Inc()
		return nil, fmt.Errorf("queue accept from %s: %d bytes, limit %d: %w", m.Device, n, q.opts.MaxMessageBytes, ErrTooLarge)
	}
	var done chan error
	if m.QoS > 0 && fn == nil {
		done = make(chan error, 1)
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, ErrClosed
	}
	if failed := q.failed; failed != nil {
		q.mu.Unlock()
		q.m.refused.WithLabelValues(stoppedReason(failed)).Inc()
		return nil, fmt.Errorf("queue accept: queue stopped after a disk error: %w", failed)
	}
	// None held: zero, not an age (entries dropped by held but not yet
	// trimmed would otherwise read as 292 years old).
	if oldest := q.oldestLocked(); !oldest.IsZero() && q.opts.Now().Sub(oldest) > q.opts.MaxAge {
		q.mu.Unlock()
		q.m.refused.WithLabelValues("age").Inc()
		return nil, fmt.Errorf("queue accept from %s: oldest held message is older than %s: %w", m.Device, q.opts.MaxAge, bridges.ErrQueueFull)
	}
	off := len(q.batchBuf)
	q.batchBuf = frameMsg(q.batchBuf, q.nextSeq, &m)
	n := len(q.batchBuf) - off
	dev := q.deviceLocked(m.Device)
	if dev.bytes+int64(n) > q.opts.MaxDeviceBytes {
		q.batchBuf = q.batchBuf[:off]
		held := dev.bytes
		q.mu.Unlock()
		q.m.refused.WithLabelValues("device_share").Inc()
		q.lines.DeviceLine(q.log, slog.LevelWarn, "device_share", m.Device, "queue: a device's new messages refused: it holds its share of the queue in messages not yet delivered (the gateway's upstream.queue_max_bytes_per_device; in the parking queue an eighth of upstream.parked_max_bytes); the other devices' are still taken (bastion_queue_refusals_total{reason=\"device_share\"})",
			"held_bytes", held, "share_bytes", q.opts.MaxDeviceBytes)
		return nil, fmt.Errorf("queue accept from %s: the device holds %d bytes of messages not yet delivered, %d with this one, above its share of the queue, %d bytes; refused until some are delivered: %w",
			m.Device, held, held+int64(n), q.opts.MaxDeviceBytes, bridges.ErrQueueFull)
	}
	if held := q.diskBytes() + q.batchB + q.writingB; held+int64(n) > q.opts.MaxBytes {
		q.batchBuf = q.batchBuf[:off]
		// Bytes that delivering frees nothing of are named, or the
		// refusal would read as a slow link for good; so are delivered
		// records kept behind an undelivered one, or it would read as a
		// backlog of held messages.
		var stuck string
		if ub, paths := q.unverifiedLocked(); ub > 0 {
			stuck = fmt.Sprintf(" (%d of them in %s, whose header the disk cannot read: kept, none of its messages held, until an open reads it again; if the disk never will, move it away, losing its messages)",
				ub, strings.Join(paths, ", "))
		}
		if db, oldest := q.keptBehindLocked(); db > 0 {
			stuck += fmt.Sprintf(" (%d of them in segments of delivered records only, kept behind the oldest undelivered message, seq %d, received %s: disk is freed from the front, so they count until it is delivered, or until copying the held messages of the oldest segment forward frees four times what it copies)",
				db, oldest.seq, time.Unix(0, oldest.received).UTC().Format(time.RFC3339))
		}
		depth := q.depth
		q.mu.Unlock()
		// A full queue may be taking no commit that would make the writer
		// look at the head segment: this asks it to.
		signal(q.compactDue)
		q.m.refused.WithLabelValues("bytes").Inc()
		return nil, fmt.Errorf("queue accept from %s: %d bytes on disk%s, limit %d, held messages: %d: %w", m.Device, held, stuck, q.opts.MaxBytes, depth, bridges.ErrQueueFull)
	}
	q.batch = append(q.batch, pending{off: off, n: n, seq: q.nextSeq, recv: m.Received.UnixNano(), dev: dev, done: done, fn: fn})
	q.batchB += int64(n)
	q.holdLocked(dev, int64(n))
	q.nextSeq++
	gathering := q.gather > 0 && len(q.batch) < q.gather
	q.mu.Unlock()
	if !gathering {
		q.kick()
	}
	return done, nil
}

func (q *Queue) kick() { signal(q.wake) }

// signal wakes the writer through ch (capacity 1) without waiting: a
// signal already pending covers this one.
func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (q *Queue) oldestLocked() time.Time {
	for _, e := range q.ents {
		if !e.acked {
			return time.Unix(0, e.received)
		}
	}
	return time.Time{}
}

// writer is the single goroutine that writes: message batches (one write
// for everything that arrived meanwhile, then its fsync), and
// delivered-marks piggybacked on those or flushed (without fsync) when the
// timer Ack armed fires. When idle it writes nothing.
func (q *Queue) writer() {
	defer close(q.stopped)
	defer func() {
		if q.aio != nil {
			q.aio.close()
		}
	}()
	gt := time.NewTimer(time.Hour)
	gt.Stop()
	for {
		fired := false
		select {
		case <-q.wake:
		case <-q.ackDue:
			fired = true
		case <-q.resumeDue:
			q.resume()
			continue
		case <-q.compactDue:
			q.compact()
			continue
		case done := <-q.syncReq:
			done <- q.syncMarks()
			continue
		case <-q.stop:
			q.flush(true)
			q.marksAfterFailure()
			return
		}
		q.mu.Lock()
		haveBatch, haveAcks := len(q.batch) > 0, len(q.acks) > 0
		if fired {
			q.ackArmed = false
		}
		q.mu.Unlock()
		switch {
		case haveBatch:
			// The writer was woken by the first message of what may be
			// many: a device session that accepts a message makes the
			// writer its P's next goroutine, ahead of the other sessions
			// readied by the same network poll. Yielding once lets those
			// run and join this batch first (50 devices: 14–15 → 20–22
			// messages per fsync; with a single P, the writer otherwise
			// commits one message while the rest wait behind its fsync).
			runtime.Gosched()
			q.gatherWait(gt)
			q.flush(true)
		case haveAcks && fired:
			q.flush(false)
		}
	}
}

// maxGatherWait bounds how long gatherWait holds a batch back.
const maxGatherWait = 500 * time.Microsecond

// gatherWait is the adaptive part of the group commit: when the last
// commit carried several messages (several sessions, or one pipelining)
// and fewer are waiting now, it waits, at most half the mean fsync time and
// maxGatherWait, for the batch to grow back to that size, so that writers
// whose acknowledgement just went out join this commit instead of starting
// the next. A lone writer (last batch of one) is never delayed.
func (q *Queue) gatherWait(t *time.Timer) {
	q.mu.Lock()
	target := q.lastBatch
	wait := min(q.fsyncEWMA/2, maxGatherWait)
	if q.gatherFor > 0 {
		wait = q.gatherFor
	}
	if target < 2 || len(q.batch) >= target || q.closed || wait <= 0 {
		q.mu.Unlock()
		return
	}
	q.gather = target
	q.mu.Unlock()
	select { // a kick that came before gather was set
	case <-q.wake:
	default:
	}
	q.mu.Lock()
	grown := len(q.batch) >= target
	q.mu.Unlock()
	if !grown {
		t.Reset(wait)
		select {
		case <-q.wake:
		case <-t.C:
		case <-q.stop:
		}
		t.Stop()
	}
	q.mu.Lock()
	q.gather = 0
	q.mu.Unlock()
}

// flush writes pending delivered-marks to the active segment; with sync,
// the message batch with them, and then commits the batch: its fsync, then
// its Accepts are told. New messages gather in the next batch meanwhile.
// Without sync the batch stays for the next flush(true): a batch is never
// told durable without its fsync. It returns why the marks were not
// written (kept for the next try), for SyncAcks; the writer's own calls
// need not look (flush logs and retries).
func (q *Queue) flush(sync bool) error {
	q.mu.Lock()
	var batch []pending
	var batchBuf []byte
	if sync {
		batch, batchBuf = q.batch, q.batchBuf
		if len(batch) > 0 {
			q.lastBatch = len(batch)
		}
		q.batch, q.batchBuf = q.spareBatch[:0], q.spareBuf[:0]
		q.spareBatch, q.spareBuf = nil, nil
		q.batchB, q.writingB = 0, q.batchB
	}
	acks := q.acks
	q.acks = nil
	if q.failed != nil {
		// Nothing is written after a failed write or fsync: the marks
		// wait for resume's segment (resume arms their timer; Close's,
		// see marksAfterFailure), or they would be lost and their
		// messages sent again after a restart.
		q.acks = acks
		err := fmt.Errorf("queue: stopped after a disk error, delivered-marks wait for a new segment: %w", q.failed)
		q.failBatchLocked(batch, batchBuf)
		return err
	}
	buf := q.wbuf[:0]
	if len(acks) > 0 {
		slices.Sort(acks)
		buf = frameAck(buf, acks)
	}
	ackLen := len(buf)
	buf = append(buf, batchBuf...)
	if cap(buf) <= maxKeptBuf {
		q.wbuf = buf
	}
	if len(buf) == 0 {
		q.writingB = 0
		q.mu.Unlock()
		q.recycle(batch, batchBuf)
		return nil
	}
	var err error
	// A new segment only after one that holds something: an empty one
	// would be left behind, and it has the name (its base, the next seq)
	// the new one would take. The same for one named after this batch's
	// first seq (started by resume or Open) that holds only
	// delivered-marks: the new segment would replace its file.
	if active := q.segs[len(q.segs)-1]; active.size > active.hdr && active.size+int64(len(buf)) > q.opts.SegmentBytes && len(batch) > 0 && batch[0].seq != active.base {
		// Normally the spare is renamed; without one, writing the new
		// segment's zeros and syncing them takes milliseconds, and
		// admissions, Next and Ack go on meanwhile. Only this goroutine
		// changes the last segment, and reclaim never removes the last
		// one.
		q.mu.Unlock()
		var ns *segment
		ns, err = q.rotate(batch[0].seq)
		q.mu.Lock()
		if err == nil {
			q.segs = append(q.segs, ns)
		}
	}
	seg := q.segs[len(q.segs)-1]
	off := seg.size
	q.mu.Unlock()

	wrote := err == nil // the write was tried (the rotation, if any, worked)
	if wrote {
		seal(buf, seg.key)
		_, err = q.writeAt(seg.f, buf, off)
		if err != nil {
			err = fmt.Errorf("queue: write %d bytes to %s at %d: %w", len(buf), seg.path, off, err)
		}
	}
	if err == nil {
		// Index (and wake the link) as soon as the bytes are written: the
		// link may send while the fsync runs. Until the fsync returns, the
		// device is not acknowledged, so a crash now means it sends again
		// (a duplicate upstream), never a loss.
		q.mu.Lock()
		seg.size = off + int64(len(buf))
		if !sync && ackLen > 0 {
			seg.marksUnsynced = true
		}
		q.maybePrepareSpareLocked(seg)
		q.writingB = 0
		q.ackRetry = 0 // the disk writes again: marks wait AckFlushInterval
		if q.acks == nil && cap(acks) <= maxKeptBuf/8 {
			q.acks = acks[:0] // written: its array takes the next marks
		}
		pos := off + int64(ackLen)
		for _, p := range batch {
			q.ents = append(q.ents, entry{seq: p.seq, seg: seg, off: pos, n: int32(p.n), received: p.recv, dev: p.dev})
			pos += int64(p.n)
			seg.live++
			seg.liveBytes += int64(p.n)
		}
		q.depth += len(batch)
		// Accepted once written if its Accept already returned (QoS 0);
		// the others once commit tells them so.
		q.m.accepted.Add(float64(len(batch) - waiting(batch)))
		q.m.depth.Set(float64(q.depth))
		q.m.bytes.Set(float64(q.diskBytes()))
		if q.compactPlanLocked() != nil {
			// The bytes the head segment keeps crossed compactAbove: the
			// writer compacts after this commit. Looked at here, under the
			// lock flush holds anyway, so that a commit with nothing due
			// costs the look and nothing else (no lock of its own, which
			// the link's Next and Ack would meet right after the commit).
			signal(q.compactDue)
		}
		if len(batch) > 0 {
			close(q.notify)
			q.notify = make(chan struct{})
		}
		q.mu.Unlock()
		q.recycle(nil, batchBuf)
		if sync {
			q.commit(seg, batch)
		}
		return nil
	}

	// A failed write leaves seg.size where it was; the marks it carried
	// go back to the pending list.
	hint := "check the disk (the kernel log shows I/O errors)"
	told := error(diskError{err}) // what the batch's Accepts get
	if errors.Is(err, syscall.ENOSPC) {
		hint = "the disk is full: free space on it"
		told = fmt.Errorf("%w: %w", bridges.ErrQueueFull, err)
	}
	q.mu.Lock()
	q.writingB = 0 // nothing of the batch was indexed
	q.releaseBatchLocked(batch)
	q.acks = append(q.acks, acks...)
	if len(batch) > 0 {
		// Refusing this batch alone and writing the next one (over the
		// same bytes, or once the rotation works) would acknowledge
		// messages admitted while this one was written, from the same
		// devices: stored ahead of this batch's, which their devices send
		// again. So it stops the queue as a failed fsync does: the batch
		// gathered meanwhile is refused, then every admission, until
		// resume starts a new segment.
		//
		// Whatever of the batch the write put in the page cache before it
		// failed may reach the disk: whole records with valid checksums,
		// which recover would take and deliver, though their devices were
		// told to send them again (and the cloud, getting the resend under
		// another seq, cannot drop it). Their seqs are marked delivered:
		// the marks wait for resume's segment (or Close's, see
		// marksAfterFailure), later than this one, and recover applies the
		// marks of every segment to the messages of all.
		if wrote {
			for _, p := range batch {
				q.acks = append(q.acks, p.seq)
			}
		}
		if q.stopLocked(told) {
			what := "queue write failed"
			if !wrote {
				what = "queue could not start a new segment"
			}
			q.log.Error(what+"; refusing new messages, trying a new segment in "+q.resumeWait.String()+"; "+hint, "err", err)
		}
	} else {
		// Only delivered-marks (no message refused, so no order to
		// keep): tried again. A disk that keeps failing is tried less and
		// less often (and logged so), not every AckFlushInterval for good.
		if q.ackRetry == 0 {
			q.ackRetry = q.opts.AckFlushInterval
		} else {
			q.ackRetry = min(2*q.ackRetry, max(ackRetryMax, q.opts.AckFlushInterval))
		}
		// The timer may have fired for this flush already: without a new
		// one they would wait for the next batch or Ack.
		q.armAckFlushLocked()
		q.log.Error("queue: writing delivered-marks failed; they are kept and written with the next batch or tried again in "+
			q.ackRetry.String()+" (a restart before then sends their messages upstream again); "+hint, "marks", len(q.acks), "err", err)
	}
	q.mu.Unlock()
	q.refusedBatch(stoppedReason(err), batch)
	for i := range batch {
		batch[i].tell(told)
	}
	q.recycle(batch, batchBuf)
	return err
}

// stoppedReason is the refusal reason (metric label) of a message refused
// because of err, a failed write, rotation or fsync, or the queue stopped
// after one.
func stoppedReason(err error) string {
	if errors.Is(err, syscall.ENOSPC) {
		return "disk_full"
	}
	return "disk_error"
}

// stopLocked stops the queue after a failed write, rotation or fsync
// (failed: the error its batch was told): nothing more is written to the
// active segment, the batch gathered meanwhile and every admission are
// refused, and resume tries a new segment after resumeWait. It reports
// whether the queue was running (the caller logs the failure). Caller
// holds q.mu.
func (q *Queue) stopLocked(failed error) bool {
	if q.failed != nil {
		return false
	}
	q.failed = failed
	q.m.stopped.Set(1)
	// A disk that fails again right after a resume waits longer each
	// time: every resume costs a new preallocated segment.
	if q.resumeWait == 0 {
		q.resumeWait = cmp.Or(q.opts.resumeAfter, resumeFirst)
	} else {
		q.resumeWait = nextResumeWait(q.resumeWait, failed)
	}
	q.armResumeLocked()
	return true
}

// nextResumeWait doubles the pause before the next resume after one that
// failed with err, up to resumeMax, or resumeMaxFull for a full disk: room
// made by the operator, or by delivery that removes no segment (the full
// one is the active one), is found within that, and a try on a full disk
// costs a failed preallocation, not a segment's writes.
func nextResumeWait(cur time.Duration, err error) time.Duration {
	if errors.Is(err, syscall.ENOSPC) {
		return min(2*cur, resumeMaxFull)
	}
	return min(2*cur, resumeMax)
}

// refusedBatch counts batch's messages, refused after their admission, as
// refusals for reason.
func (q *Queue) refusedBatch(reason string, batch []pending) {
	if len(batch) > 0 {
		q.m.refused.WithLabelValues(reason).Add(float64(len(batch)))
	}
}

// failBatchLocked refuses batch after an earlier failed write, rotation or
// fsync and unlocks q.mu.
func (q *Queue) failBatchLocked(batch []pending, batchBuf []byte) {
	q.writingB = 0
	q.releaseBatchLocked(batch)
	err := fmt.Errorf("queue: disk error earlier: %w", q.failed)
	q.mu.Unlock()
	q.refusedBatch(stoppedReason(err), batch)
	for i := range batch {
		batch[i].tell(err)
	}
	q.recycle(batch, batchBuf)
}

// commit makes batch, written to seg, durable: fsync, then tells its
// Accepts, in order. After a failed fsync what the page cache holds of the
// file is unknown, so every later batch is refused too and the queue
// refuses new messages until resume has started a new segment (the
// messages may reappear on restart, or be sent already: duplicates, never
// an acknowledged loss).
// The writer runs it: the next batch is written only after this one's
// Accepts were told.
func (q *Queue) commit(seg *segment, batch []pending) {
	t0 := time.Now()
	sync := q.opts.Sync
	if sync == nil {
		sync = q.defaultSync
	}
	err := sync(seg.f)
	took := time.Since(t0)
	q.m.fsyncSec.Observe(took.Seconds())
	q.m.fsyncs.Inc()
	q.mu.Lock()
	if q.fsyncEWMA == 0 {
		// The first commit's fsync is the mean until there are more: from
		// zero, an average that moves an eighth of the way would call a
		// slow disk quick for its first several commits (useRawSync).
		q.fsyncEWMA = max(took, time.Nanosecond)
	} else {
		q.fsyncEWMA += (took - q.fsyncEWMA) / 8
	}
	switch {
	case err != nil:
		err = diskError{fmt.Errorf("queue: fsync %s: %w", seg.path, err)}
		if q.stopLocked(err) {
			q.log.Error("queue fsync failed; refusing new messages, trying a new segment in "+q.resumeWait.String(), "err", err)
		}
	case q.failed != nil:
		err = fmt.Errorf("queue: disk error earlier: %w", q.failed)
	default:
		q.resumeWait = 0          // the disk works: a later failure starts over
		seg.marksUnsynced = false // the marks written before are synced too
	}
	q.mu.Unlock()
	// Only the messages whose Accept learns the outcome now: those told
	// of the failure are refused (their devices resend; the written copy
	// stays held and may be sent too: a duplicate), the others (QoS 0)
	// were counted accepted when written and stay held.
	if err != nil {
		q.m.refused.WithLabelValues("disk_error").Add(float64(waiting(batch)))
	} else {
		q.m.accepted.Add(float64(waiting(batch)))
	}
	for i := range batch {
		batch[i].tell(err)
	}
	q.recycle(batch, nil)
}

// waiting is how many of batch's messages wait to be told the outcome of
// their commit (QoS 1: a channel or a callback).
func waiting(batch []pending) int {
	n := 0
	for i := range batch {
		if batch[i].done != nil || batch[i].fn != nil {
			n++
		}
	}
	return n
}

// resumeFirst is how long the queue refuses messages after a failed write,
// rotation or fsync before it tries to accept again; each failed try, and
// each failure before a commit has succeeded since, doubles it, up to
// resumeMax (resumeMaxFull for a full disk: nextResumeWait).
const resumeFirst, resumeMax, resumeMaxFull = 10 * time.Second, 5 * time.Minute, 30 * time.Second

// armResumeLocked schedules the writer's next resume. Caller holds q.mu.
func (q *Queue) armResumeLocked() {
	time.AfterFunc(q.resumeWait, func() { signal(q.resumeDue) })
}

// resume makes the queue accept again after a failed write, rotation or
// fsync. After a failed fsync the page cache may call the failed commit's
// pages clean while the disk does not hold them, and a failed write may
// have left part of its batch there, so nothing more is written after
// them: the commits from here on go to a new segment (made and synced like
// any other), and what the failure left ends a segment that recovery
// treats as completed (corrupt bytes there are skipped, not followed by a
// cut of later messages). The failed batch was never acknowledged. If the
// new segment cannot be made durable either, it tries again later. The
// writer goroutine only (it alone changes the last segment).
func (q *Queue) resume() {
	q.mu.Lock()
	if q.failed == nil || q.closed {
		q.mu.Unlock()
		return
	}
	failed, gathered := q.failed, len(q.batch) > 0
	q.mu.Unlock()
	if gathered {
		// Admitted before the failure (admissions are refused since) and
		// not yet refused, the writer having come here first: refused as
		// the failed batch was, or it would be stored ahead of that
		// batch's resend.
		q.flush(true)
	}
	seg, err := q.startAfterFailure()
	q.mu.Lock()
	defer q.mu.Unlock()
	if err != nil {
		q.resumeWait = nextResumeWait(q.resumeWait, err)
		q.log.Error("queue: still cannot write after a disk error; trying again in "+q.resumeWait.String(), "err", err)
		q.armResumeLocked()
		return
	}
	q.log.Warn("queue: accepting messages again after a disk error; new commits go to a new segment",
		"segment", seg.path, "failed_with", failed)
	if len(q.acks) > 0 {
		q.armAckFlushLocked() // kept while stopped (see flush)
	}
}

// startAfterFailure starts the segment that commits go to after a failure
// (the active one if it is named after the next seq and holds nothing yet,
// so that the name is not taken twice) and clears the failure. It returns
// the segment. The writer goroutine only.
func (q *Queue) startAfterFailure() (*segment, error) {
	q.mu.Lock()
	base, active := q.nextSeq, q.segs[len(q.segs)-1]
	if active.base == base && active.size > active.hdr {
		// Named after the next seq, yet it holds records: a compaction
		// started it for its copies, and their fsync failed. The new
		// segment cannot take its name, so that seq is never given out
		// (seqs need only increase; nothing is admitted while stopped).
		q.nextSeq++
		base++
	}
	q.mu.Unlock()
	seg := active
	if active.base != base || active.size > active.hdr {
		var err error
		if seg, err = q.createSegment(base); err != nil {
			return nil, err
		}
	}
	q.mu.Lock()
	if seg != active {
		q.segs = append(q.segs, seg)
	}
	q.failed = nil
	q.m.stopped.Set(0)
	q.ackRetry = 0 // its new segment was written
	q.mu.Unlock()
	return seg, nil
}

// marksAfterFailure writes, at Close, the delivered-marks kept while a
// failure stopped the queue, to a new segment as resume would have. Among
// them may be a failed write's batch (see flush): without them the next
// open could take its records and deliver messages their devices were told
// to send again. The failure stays q.failed, for Close to report. The
// writer goroutine only, after its last flush.
func (q *Queue) marksAfterFailure() {
	q.mu.Lock()
	n, failed := len(q.acks), q.failed
	q.mu.Unlock()
	if failed == nil || n == 0 {
		return
	}
	if _, err := q.startAfterFailure(); err != nil {
		q.log.Error("queue: closing after a disk error, could not start a segment for the delivered-marks kept since; their messages come back at the next open (and are sent again)",
			"marks", n, "err", err)
		return
	}
	q.flush(true) // nothing is admitted any more: the marks, and their fsync
	q.mu.Lock()
	if q.failed == nil {
		q.failed = failed
	}
	q.mu.Unlock()
}

// maxKeptBuf bounds the buffers the writer keeps for the next batch: a
// burst of large messages does not pin its memory.
const maxKeptBuf = 1 << 20

// recycle hands a written batch's slices back for the next one.
// Either may be nil (not handed back).
func (q *Queue) recycle(batch []pending, buf []byte) {
	clear(batch) // drop the channels
	q.mu.Lock()
	if batch != nil && cap(batch) <= maxKeptBuf/64 {
		q.spareBatch = batch[:0]
	}
	if buf != nil && cap(buf) <= maxKeptBuf {
		q.spareBuf = buf[:0]
	}
	q.mu.Unlock()
}

// Next returns up to max held entries with Seq > after, in order, waiting
// until there is at least one or ctx ends. An entry is visible once written,
// possibly before its fsync returned (sending it early can only duplicate).
// A held message whose record no longer decodes is dropped, not returned
// as an error, and one the disk cannot read is dropped after
// unreadableGrace (see held and loseLocked).
func (q *Queue) Next(ctx context.Context, after uint64, max int) ([]Entry, error) {
	out, _, err := q.NextInto(ctx, after, max, nil, nil)
	return out, err
}

// NextInto is Next reusing the caller's entries slice dst and read buffer
// buf, both from its previous call (nil the first time), so that reading
// a batch allocates nothing in the steady state. The entries' payloads are
// slices of the returned buffer: they are valid until that buffer is
// passed back, and must not be kept beyond it (device and topic strings
// may be kept). The upstream link's sender uses it.
func (q *Queue) NextInto(ctx context.Context, after uint64, max int, dst []Entry, buf []byte) ([]Entry, []byte, error) {
	for {
		out, nbuf, ch, err := q.held(after, max, dst[:0], buf[:0])
		if err != nil || len(out) > 0 {
			return out, nbuf, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, nbuf, ctx.Err()
		}
	}
}

// Held is Next without the wait: what is held now (none: an empty result).
func (q *Queue) Held(after uint64, max int) ([]Entry, error) {
	out, _, _, err := q.held(after, max, nil, nil)
	return out, err
}

// held appends to out up to max held entries with Seq > after, reading
// them into buf (grown if needed), and returns them, the buffer, and the
// channel that is closed when the next one is written.
//
// The disk is read without q.mu, so that a slow read (an SD card) holds up
// no admission, commit or Ack: the reads are planned under the lock
// (planLocked), made without it (readAhead), and the entries are taken
// under it again (heldLocked), which skips what was delivered or dropped
// meanwhile and stops at what was not read ahead. A held entry's bytes
// never change once it is indexed (see loseLocked), so the bytes read
// ahead are the ones a read under the lock would give.
func (q *Queue) held(after uint64, max int, out []Entry, buf []byte) ([]Entry, []byte, <-chan struct{}, error) {
	if max <= 0 {
		max = 1
	}
	// Room for the usual plan on the stack: a read costs no allocation.
	var entsA [64]entry
	var spansA [8]plannedRead
	var gotA [8]readDone
	out0, buf0 := len(out), buf
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return nil, buf, nil, ErrClosed
		}
		// Taken with the plan: closed if an entry is written after it.
		notify := q.notify
		ents, spans := q.planLocked(after, max, entsA[:0], spansA[:0])
		raw := q.rawIO()
		q.mu.Unlock()
		if len(spans) == 0 {
			return out, buf, notify, nil
		}
		got, nbuf := q.readAhead(gotA[:0], ents, spans, buf, raw)
		var err error
		if out, err = q.heldLocked(after, max, ents[len(ents)-1].seq, out, got); err != nil || len(out) > out0 {
			return out, nbuf, notify, err
		}
		// What was planned was delivered or dropped meanwhile, and there
		// may be entries after it: plan again. Nothing handed out points
		// into what was read.
		buf = buf0
	}
}

// plannedRead is one read held plans: the records of ents[from:to], in
// one segment within span bytes from ents[from].
type plannedRead struct {
	from, to int
	span     int64
}

// readDone is what a read ahead gave: len(b) bytes of seg at off, or err
// for n bytes there.
type readDone struct {
	seg *segment
	off int64
	n   int64
	b   []byte
	err error
}

// planLocked appends to ents the held entries held would read now (up to
// max not delivered, with Seq > after, and the delivered ones among them)
// and to spans the reads that cover them. Caller holds q.mu.
func (q *Queue) planLocked(after uint64, max int, ents []entry, spans []plannedRead) ([]entry, []plannedRead) {
	i := sort.Search(len(q.ents), func(i int) bool { return q.ents[i].seq > after })
	have := 0
	for i < len(q.ents) && have < max {
		if q.ents[i].acked {
			i++
			continue
		}
		j, span := q.spanLocked(i, have, max, math.MaxUint64)
		spans = append(spans, plannedRead{from: len(ents), to: len(ents) + j - i, span: span})
		for _, e := range q.ents[i:j] {
			ents = append(ents, e)
			if !e.acked {
				have++
			}
		}
		i = j
	}
	return ents, spans
}

// spanLocked returns the end j in q.ents and the length of the read that
// starts at held entry i, when have entries are handed out already:
// entries next to each other in one segment are read with one read (the
// delivered-marks between batches come along), up to max entries in all
// (counting those delivered), none with a Seq above last, none across a
// hole, within maxReadSpan, each after the one before it in the segment
// (a segment can hold moved records, written after messages with higher
// seqs: see compact). Caller holds q.mu.
func (q *Queue) spanLocked(i, have, max int, last uint64) (int, int64) {
	j, span := i+1, int64(q.ents[i].n)
	for ; j < len(q.ents) && have+(j-i) < max && q.ents[j].seq <= last; j++ {
		e := q.ents[j]
		end := e.off + int64(e.n) - q.ents[i].off
		if e.seg != q.ents[i].seg || e.off <= q.ents[j-1].off || end > maxReadSpan || e.seg.inHole(q.ents[i].off, e.off) {
			break
		}
		span = end
	}
	return j, span
}

// readAhead makes the reads planLocked planned, without q.mu, into buf
// (grown if needed), and appends what each gave to got. After a read
// that fails with EIO it reads that read's entries one by one, as
// heldLocked will, and stops: heldLocked hands out nothing after a
// message it still tries.
func (q *Queue) readAhead(got []readDone, ents []entry, spans []plannedRead, buf []byte, raw bool) ([]readDone, []byte) {
	read := func(seg *segment, off, n int64) error {
		var b []byte
		b, buf = grow(buf, n)
		err := q.readFull(seg.f, b, off, raw)
		if err != nil {
			b = nil
		}
		got = append(got, readDone{seg: seg, off: off, n: n, b: b, err: err})
		return err
	}
	for _, s := range spans {
		first := ents[s.from]
		err := read(first.seg, first.off, s.span)
		if err == nil {
			continue
		}
		if errors.Is(err, syscall.EIO) {
			for _, e := range ents[s.from:s.to] {
				if !e.acked {
					read(e.seg, e.off, int64(e.n))
				}
			}
		}
		return got, buf
	}
	return got, buf
}

// heldLocked appends to out up to max held entries with Seq > after and
// at most last, in order, with their bytes from got; it stops at one
// whose bytes got does not hold (what was planned changed meanwhile). It
// takes q.mu.
func (q *Queue) heldLocked(after uint64, max int, last uint64, out []Entry, got []readDone) ([]Entry, error) {
	q.mu.Lock()
	lost := false
	defer func() {
		if lost {
			// What was dropped frees its entries and segments now, as an
			// Ack's would: with nothing else held no Ack comes, and the
			// queue would count them against MaxBytes for good.
			q.reclaim()
			q.m.bytes.Set(float64(q.diskBytes()))
		}
		q.mu.Unlock()
	}()
	if q.closed {
		return nil, ErrClosed
	}
	i := sort.Search(len(q.ents), func(i int) bool { return q.ents[i].seq > after })
	if i < len(q.ents) && out == nil {
		out = make([]Entry, 0, min(max, len(q.ents)-i))
	}
	for i < len(q.ents) && len(out) < max && q.ents[i].seq <= last {
		if q.ents[i].acked {
			i++
			continue
		}
		j, span := q.spanLocked(i, len(out), max, last)
		var err error
		n0 := len(out)
		if out, err = q.readSpan(got, out, q.ents[i:j], span); err != nil {
			if errors.Is(err, errNotRead) {
				return out[:n0], nil
			}
			if !errors.Is(err, syscall.EIO) && !errors.Is(err, errCorrupt) {
				return out[:n0], err
			}
			// The disk cannot read part of the span, or a record in it
			// no longer decodes: take its messages one by one (read so
			// by readAhead after a failed read; what the span's read
			// handed out before the bad one comes again).
			// One the disk has not read for unreadableGrace is dropped,
			// or the link would stop at it for good; until then what
			// came before it is handed out and it is tried again (a disk
			// that comes back, a card reader's glitch, loses nothing).
			// One that no longer decodes is dropped at once: see
			// loseLocked.
			out = out[:n0]
			var stuck error
			for k := i; k < j; k++ {
				if q.ents[k].acked {
					continue
				}
				if stuck != nil {
					// Nothing after a message that is still tried is handed
					// out (order per device); only start its clock too.
					if _, perr := q.readSpan(got, nil, q.ents[k:k+1], int64(q.ents[k].n)); errors.Is(perr, syscall.EIO) {
						q.unreadableLocked(k)
					}
					continue
				}
				var kerr error
				if out, kerr = q.readSpan(got, out, q.ents[k:k+1], int64(q.ents[k].n)); kerr == nil {
					continue
				}
				if errors.Is(kerr, errNotRead) {
					return out, nil
				}
				if errors.Is(kerr, errCorrupt) || errors.Is(kerr, syscall.EIO) && q.unreadableLocked(k) {
					q.loseLocked(k, kerr)
					lost = true
					continue
				}
				stuck = kerr
			}
			if stuck != nil {
				if len(out) > 0 {
					return out, nil
				}
				return out, stuck
			}
		}
		i = j
	}
	return out, nil
}

// unreadableGrace is how long a held message must have been unreadable
// (EIO at every try) before it is dropped.
const unreadableGrace = 10 * time.Minute

// unreadableLocked notes that held entry k could not be read and reports
// whether that has been so for unreadableGrace and the queue is not
// stopped by a failed fsync (a disk failing as a whole keeps everything).
// Caller holds q.mu.
func (q *Queue) unreadableLocked(k int) bool {
	now := q.opts.Now()
	if q.unreadable == nil {
		q.unreadable = map[uint64]time.Time{}
	}
	first, ok := q.unreadable[q.ents[k].seq]
	if !ok {
		q.unreadable[q.ents[k].seq] = now
		q.log.Warn("queue: a held message cannot be read (EIO); trying again", "seq", q.ents[k].seq,
			"segment", q.ents[k].seg.path, "offset", q.ents[k].off, "dropped_after", unreadableGrace)
		return false
	}
	return q.failed == nil && now.Sub(first) >= unreadableGrace
}

// loseLocked drops held entry k, which the disk cannot read (EIO for
// unreadableGrace) or which no longer decodes (err wraps errCorrupt): it is
// marked delivered (so a restart does not try it again) and counted, with
// an error naming it and why. held reclaims its entry and segment once it
// is done iterating over q.ents. Caller holds q.mu.
//
// A record that no longer decodes is dropped at its first read, without
// the grace an EIO gets and even while a failed fsync stops the queue.
// It decoded when it was indexed (written whole by this process before
// its entry existed, or decoded by recover), and segments are append-only:
// a commit writes only after the last indexed record, recover's truncation
// happens before Open returns, nothing rewrites a record in place, so no
// read can race a write of its bytes. Its bytes changed after: the disk's
// or the memory's corruption, or pages a failed writeback left clean that
// the kernel dropped and read back without them (that commit was never
// acknowledged). A read goes through the page cache, so trying again reads
// the same bytes; unlike EIO, where the device says it could not read and
// a card reader's glitch passes, nothing says another try would differ.
// Waiting unreadableGrace would only hold every device's messages behind
// it (the link sends in order) and fill the queue.
func (q *Queue) loseLocked(k int, err error) {
	e := &q.ents[k]
	e.acked = true
	e.seg.live--
	e.seg.liveBytes -= int64(e.n)
	q.releaseLocked(e.dev, int64(e.n))
	q.acks = append(q.acks, e.seq)
	q.depth--
	q.m.lost.Inc()
	q.m.depth.Set(float64(q.depth))
	delete(q.unreadable, e.seq)
	why := "has been unreadable for " + unreadableGrace.String() + " (the disk is failing)"
	if errors.Is(err, errCorrupt) {
		why = "no longer decodes (its bytes changed on disk or in memory: corruption)"
	}
	q.log.Error("queue: a held message "+why+"; dropping it so that the messages after it are delivered",
		"seq", e.seq, "segment", e.seg.path, "offset", e.off, "err", err)
	q.armAckFlushLocked()
}

// maxReadSpan bounds one read in Next.
const maxReadSpan = 256 << 10

// errNotRead: readAhead did not read the bytes asked for.
var errNotRead = errors.New("queue: not read ahead")

// readSpan appends the held entries of es, which lie in one segment within
// span bytes from es[0], decoding them from got (readAhead's reads). It
// returns errNotRead if got holds neither those bytes nor the error of
// reading them. Caller holds q.mu.
func (q *Queue) readSpan(got []readDone, out []Entry, es []entry, span int64) ([]Entry, error) {
	first := es[0]
	b, err := readAlready(got, first.seg, first.off, span)
	if err == errNotRead {
		return out, err
	}
	if err != nil {
		return out, fmt.Errorf("queue: read seqs %d..%d from %s at %d: %w", first.seq, es[len(es)-1].seq, first.seg.path, first.off, err)
	}
	for _, e := range es {
		if e.acked {
			continue
		}
		rel := e.off - first.off
		rec, _, err := decodeRecordIn(b[rel:rel+int64(e.n)], e.seg.key, &q.strs)
		if err == nil && (rec.kind != kindMsg && rec.kind != kindMoved || rec.seq != e.seq) {
			err = fmt.Errorf("%w: holds record kind %d, seq %d", errCorrupt, rec.kind, rec.seq)
		}
		if err != nil {
			if !errors.Is(err, errCorrupt) { // errShort: its length changed
				err = fmt.Errorf("%w: %w", errCorrupt, err)
			}
			return out, fmt.Errorf("queue: record for seq %d in %s at %d no longer decodes: %w", e.seq, e.seg.path, e.off, err)
		}
		out = append(out, Entry{Seq: e.seq, Message: rec.msg})
	}
	return out, nil
}

// readAlready returns the n bytes of seg at off from got: those of a read
// that covered them, or the error of a read of exactly them, the latest
// such read (after a failed read of one message alone, its read again);
// errNotRead if got has neither.
func readAlready(got []readDone, seg *segment, off, n int64) ([]byte, error) {
	for i := len(got) - 1; i >= 0; i-- {
		g := got[i]
		switch {
		case g.seg != seg:
		case g.err == nil && g.off <= off && off+n <= g.off+g.n:
			return g.b[off-g.off : off-g.off+n], nil
		case g.err != nil && g.off == off && g.n == n:
			return nil, g.err
		}
	}
	return nil, errNotRead
}

// grow returns n bytes at the free end of buf, and buf extended over them
// (a new buffer if it has no room: what earlier entries point to is never
// overwritten).
func grow(buf []byte, n int64) (b, nbuf []byte) {
	if int64(cap(buf)-len(buf)) < n {
		buf = make([]byte, 0, max(n, min(2*int64(cap(buf)), maxKeptBuf)))
	}
	l := int64(len(buf))
	return buf[l : l+n], buf[:l+n]
}

// readFull reads len(b) bytes of f at off (raw: see rawIO).
func (q *Queue) readFull(f *os.File, b []byte, off int64, raw bool) error {
	if n, err := q.readAt(f, b, off, raw); err != nil && !(errors.Is(err, io.EOF) && n == len(b)) {
		return err
	}
	return nil
}

// Ack marks entries delivered (after the upstream PUBACK) and frees their
// space. Unknown or already acked seqs are ignored.
func (q *Queue) Ack(seqs ...uint64) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return ErrClosed
	}
	n := 0
	for _, s := range seqs {
		i := sort.Search(len(q.ents), func(i int) bool { return q.ents[i].seq >= s })
		if i == len(q.ents) || q.ents[i].seq != s || q.ents[i].acked {
			continue
		}
		e := &q.ents[i]
		e.acked = true
		e.seg.live--
		e.seg.liveBytes -= int64(e.n)
		q.releaseLocked(e.dev, int64(e.n))
		q.acks = append(q.acks, s)
		delete(q.unreadable, s)
		n++
	}
	q.depth -= n
	q.reclaim()
	q.m.acked.Add(float64(n))
	q.m.depth.Set(float64(q.depth))
	q.m.bytes.Set(float64(q.diskBytes()))
	if n > 0 {
		q.armAckFlushLocked()
	}
	q.mu.Unlock()
	return nil
}

// armAckFlushLocked starts the timer that writes pending delivered-marks,
// unless it runs already. The marks ride along with the next batch; the
// timer writes them if none comes. No writer wake-up per PUBACK, one timer
// at most. After failed writes it waits ackRetry instead of
// AckFlushInterval. Caller holds q.mu.
func (q *Queue) armAckFlushLocked() {
	if q.ackArmed {
		return
	}
	q.ackArmed = true
	time.AfterFunc(cmp.Or(q.ackRetry, q.opts.AckFlushInterval), func() { signal(q.ackDue) })
}

// SyncAcks writes the delivered-marks of every Ack that returned before
// it and makes them durable: written now (the timer's flush), and every
// segment holding marks written without an fsync is synced, then the
// directory (a segment reclaim removed, with its marks, is removed for
// good). For a deletion that must hold across a power cut (the erase of a
// device's data): otherwise marks wait up to AckFlushInterval in memory
// and are never fsynced, and their messages come back at the next open.
// An error says the marks may not be on disk: a write or fsync failed
// (after a failed fsync they may be lost even if a later one succeeds),
// the queue is stopped after a disk error, ctx ended, or the queue closed.
func (q *Queue) SyncAcks(ctx context.Context) error {
	done := make(chan error, 1)
	select {
	case q.syncReq <- done:
	case <-q.stopped:
		return ErrClosed
	case <-ctx.Done():
		return fmt.Errorf("queue: syncing delivered-marks: %w", ctx.Err())
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("queue: syncing delivered-marks: %w", ctx.Err())
	}
}

// syncMarks is SyncAcks's work. The writer goroutine only: it alone
// writes, and it calls the commit's fsync (defaultSync).
func (q *Queue) syncMarks() error {
	if err := q.flush(false); err != nil {
		return err
	}
	q.mu.Lock()
	var segs []*segment
	for _, s := range q.segs {
		if s.marksUnsynced {
			segs = append(segs, s)
		}
	}
	q.mu.Unlock()
	sync := q.opts.Sync
	if sync == nil {
		sync = q.defaultSync
	}
	for _, s := range segs {
		err := sync(s.f)
		q.m.fsyncs.Inc()
		q.mu.Lock()
		removed := !slices.Contains(q.segs, s)
		if err == nil {
			s.marksUnsynced = false
		}
		q.mu.Unlock()
		// A segment reclaim removed meanwhile (its file closed) is covered
		// by the directory's sync below.
		if err != nil && !removed {
			return diskError{fmt.Errorf("queue: fsync delivered-marks in %s: %w", s.path, err)}
		}
	}
	if err := syncDir(q.dir); err != nil {
		return diskError{err}
	}
	q.m.fsyncs.Inc()
	return nil
}

// ackRetryMax bounds ackRetry, which doubles from AckFlushInterval with
// each failed write (a failing card's EIO, or ENOSPC when marks alone are
// appended past a full segment's preallocated end) and is reset by one
// that succeeds.
const ackRetryMax = time.Minute

// Stats is a snapshot of the queue.
type Stats struct {
	Depth  int       // messages held
	Bytes  int64     // bytes on disk
	Oldest time.Time // receive time of the oldest held message (zero if none)
	// Err is the disk error that stopped the queue from accepting (a
	// failed write, rotation or fsync; until resume succeeds), nil while
	// it accepts.
	Err error
}

// Stats returns a snapshot.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return Stats{Depth: q.depth, Bytes: q.diskBytes(), Oldest: q.oldestLocked(), Err: q.failed}
}

// Close writes pending marks, waits for in-flight Accepts to be written and
// closes the files. Messages held stay on disk for the next Open.
func (q *Queue) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	// New calls fail from here; the writer's last flush completes the
	// Accepts already batched.
	q.closed = true
	close(q.notify)
	q.notify = make(chan struct{})
	q.mu.Unlock()
	close(q.stop)
	<-q.stopped
	q.spareWG.Wait()
	q.mu.Lock()
	err := q.failed
	spare := q.spare
	q.spare = nil
	q.mu.Unlock()
	if spare != nil { // unused: recover would remove it anyway
		spare.Close()
		os.Remove(spare.Name())
	}
	q.m.unregister()
	q.closeFiles()
	return err
}

func (q *Queue) closeFiles() {
	for _, s := range q.segs {
		s.f.Close()
	}
}

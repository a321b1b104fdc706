package queue

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"
)

// Compaction frees the disk that a few held messages keep. Disk is freed
// from the front (reclaim): a segment is removed once it and every segment
// before it hold nothing undelivered, because a segment's delivered-marks
// may be for messages in the segments before it. So one message that stays
// undelivered near the head (its device stalled: the link can neither send
// nor park it) keeps every segment after it on disk and counted against
// MaxBytes, however little of them is held, until the queue refuses every
// device for bytes.
//
// compact copies the held records of the head segment forward, to the
// active segment, as kindMoved records with every field as it was (seq,
// received time, QoS, device, topic, payload), makes them durable, and only
// then points the index at the copies, so that reclaim removes the head
// segment and the segments of delivered records behind it.
//
// A crash at any step loses and duplicates nothing: until the copies'
// fsync returns, the head segment is untouched and the index points into
// it; whatever of the copies reached the disk is torn (cut or skipped, as
// any torn write) or a whole second copy of a held message. Once the fsync
// returns, both copies are on disk until the head segment is unlinked, and
// recover keeps one per seq (mergeMoved: the later copy). After the unlink
// only the copy is left. Delivered-marks are by seq and apply to every copy;
// a mark for a moved message is written after its copy (marks are written
// only by the writer, which runs compact, and to the active segment), so it
// stays on disk as long as the copy does.
//
// Order per device holds because the index stays in seq order (a moved
// entry keeps its seq) and Next hands out by seq: a moved message still
// comes before its device's later messages, wherever its record now lies.
const (
	// compactAbove: a compaction is considered only once the segments on
	// disk take 1/compactAbove of MaxBytes or more. Below, the queue has
	// as much room again as it uses, and the head segment's held messages
	// may well be delivered before the room is needed: a copy would cost
	// flash writes and an fsync for nothing. Above, a stuck message is on
	// its way to having every device refused, and what the copy writes is
	// small against what it frees (compactGain).
	compactAbove = 2
	// compactGain: the head segment is compacted only if what that frees
	// (its bytes but the held records', and the segments of delivered
	// records only right behind it, which reclaim then removes) is at
	// least compactGain times what it copies. So a compaction frees four
	// times what it writes, and a head segment whose records are all held
	// with nothing delivered behind it (nothing to gain) is never copied:
	// compactions cannot follow one another for nothing. One stuck message
	// among delivered ones is copied at once.
	compactGain = 4
	// compactRetryAfter is the pause before another try after a
	// compaction failed (a read, a write, a new segment).
	compactRetryAfter = time.Minute
)

// compactStep names the points of a compaction at which Queue.compacting
// (tests) runs.
type compactStep int

const (
	compactWritten compactStep = iota // copies written, not yet synced
	compactSynced                     // copies synced; index and head segment as they were
	compactFreed                      // index points at the copies; head segment removed
)

// compactPlanLocked returns the segment compact should copy forward, nil
// if none. Only the head segment (the first that can be read: an
// unverified one holds no held message and is stepped over, as reclaim
// does) is ever compacted: it is the one that keeps the rest. Caller holds
// q.mu.
func (q *Queue) compactPlanLocked() *segment {
	if q.failed != nil || q.closed || len(q.segs) < 2 || q.diskBytes() < q.opts.MaxBytes/compactAbove {
		return nil
	}
	if !q.compactRetry.IsZero() && q.opts.Now().Before(q.compactRetry) {
		return nil
	}
	var h *segment
	var gain int64
	for _, s := range q.segs[:len(q.segs)-1] { // the last is being written
		switch {
		case s.unverified: // never removed, nothing to gain there
		case h == nil && s.live == 0:
			return nil // reclaim could not remove it (logged there)
		case h == nil:
			h, gain = s, s.size-s.liveBytes
		case s.live > 0:
			return compactWorth(h, gain)
		default:
			gain += s.size
		}
	}
	return compactWorth(h, gain)
}

// compactWorth returns h if copying its held records forward frees at
// least compactGain times their bytes (gain), else nil.
func compactWorth(h *segment, gain int64) *segment {
	if h == nil || h.liveBytes*compactGain > gain {
		return nil
	}
	return h
}

// compact copies the held records of the head segment forward and removes
// it (see the comment above compactAbove), if compactPlanLocked finds one
// worth it. The writer goroutine only: it alone writes segments and
// changes the last one, so no batch is written meanwhile.
func (q *Queue) compact() {
	q.mu.Lock()
	h := q.compactPlanLocked()
	if h == nil {
		q.mu.Unlock()
		return
	}
	var es []entry
	var n int64
	for _, e := range q.ents {
		if e.seg == h && !e.acked {
			es = append(es, e)
			n += int64(e.n)
		}
	}
	active := q.segs[len(q.segs)-1]
	// A new segment for the copies is named after the first seq not yet
	// written: the next batch goes there too, as flush would have named it.
	base := q.nextSeq
	if len(q.batch) > 0 {
		base = q.batch[0].seq
	}
	raw := q.rawIO()
	// Admission counts the copies until the head segment is removed: the
	// queue may take MaxBytes and the copies, no more.
	q.writingB = n
	q.mu.Unlock()

	fail := func(what string, err error) {
		q.mu.Lock()
		q.writingB = 0
		gone := !slices.Contains(q.segs, h)
		if !gone {
			q.compactRetry = q.opts.Now().Add(compactRetryAfter)
		}
		q.mu.Unlock()
		if gone {
			// Its messages were delivered meanwhile and reclaim removed
			// it (closing its file under the read): nothing to do.
			return
		}
		q.log.Error("queue: could not copy the held messages of the oldest segment forward ("+what+"); the delivered records behind them stay on disk, counted against the queue's bytes; trying again in "+compactRetryAfter.String(),
			"segment", h.path, "held", len(es), "err", err)
	}
	buf, err := q.readMoved(h, es, n, raw)
	if err != nil {
		fail("read", err)
		return
	}
	seg := active
	if active.size > active.hdr && active.size+n > q.opts.SegmentBytes && base != active.base {
		if seg, err = q.rotate(base); err != nil {
			fail("new segment", err)
			return
		}
		q.mu.Lock()
		q.segs = append(q.segs, seg)
		q.mu.Unlock()
	}
	q.mu.Lock()
	off := seg.size
	q.mu.Unlock()
	seal(buf, seg.key)
	if _, err := q.writeAt(seg.f, buf, off); err != nil {
		// Nothing points at what the write may have left: the next batch
		// is written over it. The originals are where they were.
		fail("write", fmt.Errorf("queue: write %d bytes to %s at %d: %w", len(buf), seg.path, off, err))
		return
	}
	q.mu.Lock()
	seg.size = off + int64(len(buf))
	q.writingB = 0
	q.maybePrepareSpareLocked(seg)
	q.m.bytes.Set(float64(q.diskBytes()))
	q.mu.Unlock()
	if q.compacting != nil {
		q.compacting(compactWritten, seg, off, int64(len(buf)))
	}
	sync := q.opts.Sync
	if sync == nil {
		sync = q.defaultSync
	}
	err = sync(seg.f)
	q.m.fsyncs.Inc()
	if err != nil {
		// As after a commit's failed fsync (see commit): what the page
		// cache holds of the file is unknown, so nothing more is written
		// there. The copies are not indexed; the originals stay.
		err = diskError{fmt.Errorf("queue: fsync %s after copying held messages forward: %w", seg.path, err)}
		q.mu.Lock()
		if q.stopLocked(err) {
			q.log.Error("queue fsync failed; refusing new messages, trying a new segment in "+q.resumeWait.String(), "err", err)
		}
		q.mu.Unlock()
		return
	}
	if q.compacting != nil {
		q.compacting(compactSynced, seg, off, int64(len(buf)))
	}

	q.mu.Lock()
	moved, pos := 0, off
	for _, e := range es {
		// Delivered meanwhile (acked, or trimmed from q.ents once acked):
		// its copy is a delivered record, its mark written after it.
		i := sort.Search(len(q.ents), func(i int) bool { return q.ents[i].seq >= e.seq })
		if i < len(q.ents) && q.ents[i].seq == e.seq && !q.ents[i].acked {
			ent := &q.ents[i]
			ent.seg.live--
			ent.seg.liveBytes -= int64(ent.n)
			ent.seg, ent.off = seg, pos
			seg.live++
			seg.liveBytes += int64(ent.n)
			moved++
		}
		pos += int64(e.n)
	}
	before := q.diskBytes()
	q.reclaim()
	after := q.diskBytes()
	q.m.bytes.Set(float64(after))
	q.m.compactions.Inc()
	q.m.moved.Add(float64(moved))
	again := q.compactPlanLocked() != nil
	q.mu.Unlock()
	q.log.Info("queue: copied the held messages of the oldest segment forward, so that it and the delivered records behind it could be removed",
		"segment", h.path, "moved", moved, "moved_bytes", len(buf), "to", seg.path, "bytes_before", before, "bytes_after", after)
	if q.compacting != nil {
		q.compacting(compactFreed, seg, off, int64(len(buf)))
	}
	if again {
		signal(q.compactDue)
	}
}

// readMoved reads the records of es (held entries of h, in seq order, n
// bytes in all) and returns them as moved records, back to back, without
// their checksums (seal adds those of the segment they go to). Each must
// decode as the message it is indexed as: a record that no longer does
// fails the whole compaction (logged, tried again later), and the reader
// drops that record at its first read (loseLocked): it is the oldest held
// message, so that comes soon.
// Entries next to each other are read together, as Next reads them.
func (q *Queue) readMoved(h *segment, es []entry, n int64, raw bool) ([]byte, error) {
	buf := make([]byte, 0, n)
	var b []byte
	for i := 0; i < len(es); {
		j, end := i+1, es[i].off+int64(es[i].n)
		for j < len(es) && es[j].off >= end && es[j].off+int64(es[j].n)-es[i].off <= maxReadSpan && !h.inHole(es[i].off, es[j].off) {
			end = es[j].off + int64(es[j].n)
			j++
		}
		b = slices.Grow(b[:0], int(end-es[i].off))[:end-es[i].off]
		if err := q.readFull(h.f, b, es[i].off, raw); err != nil {
			return nil, fmt.Errorf("queue: read seqs %d..%d from %s at %d: %w", es[i].seq, es[j-1].seq, h.path, es[i].off, err)
		}
		for _, e := range es[i:j] {
			r := b[e.off-es[i].off:][:e.n]
			rec, _, err := decodeRecordIn(r, h.key, nil)
			if err == nil && (rec.kind != kindMsg && rec.kind != kindMoved || rec.seq != e.seq) {
				err = fmt.Errorf("%w: holds record kind %d, seq %d", errCorrupt, rec.kind, rec.seq)
			}
			if err != nil {
				return nil, fmt.Errorf("queue: record for seq %d in %s at %d no longer decodes: %w", e.seq, h.path, e.off, err)
			}
			start := len(buf)
			buf = append(buf, r...)
			buf[start+recHeader] = kindMoved
		}
		i = j
	}
	return buf, nil
}

// mergeMoved merges moved (the kindMoved records recover read, in the order
// it read them: segment by segment) into ents (message records, in seq
// order): a later copy of a seq replaces an earlier one, the original or
// an earlier move (a crash after the copies were synced and before their
// source was removed leaves both). The result is in seq order.
func mergeMoved(ents, moved []entry) []entry {
	if len(moved) == 0 {
		return ents
	}
	last := make(map[uint64]entry, len(moved))
	for _, e := range moved {
		last[e.seq] = e
	}
	ents = slices.DeleteFunc(ents, func(e entry) bool {
		_, ok := last[e.seq]
		return ok
	})
	ents = slices.AppendSeq(ents, maps.Values(last))
	slices.SortFunc(ents, func(a, b entry) int { return cmp.Compare(a.seq, b.seq) })
	return ents
}

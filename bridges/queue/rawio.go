package queue

import (
	"errors"
	"os"
	"runtime"
	"time"
)

// rawSyncBelow is the mean commit fsync time (fsyncEWMA) below which the
// queue's per-commit system calls (the batch's pwrite, the commit's fsync,
// Next's pread) enter the kernel without the runtime's syscall entry
// (rawFsync, rawPwrite, rawPread); above it, and with a single P, the
// os.File methods are used (and with a single P the fsync is the
// asynchronous one where Linux offers it, see defaultSync).
const rawSyncBelow = 2 * time.Millisecond

// useRawSync reports whether the queue's per-commit system calls should be
// made raw: only when the process has another P to run everything else
// meanwhile and the disk's recent commits were quick. Before the first
// commit there is no mean (zero) and the runtime's entry is used: the
// first fsync on an unknown disk may be an SD card's tens of milliseconds.
//
// Why at all: an fsync through (*os.File).Sync enters the kernel through
// the runtime's syscall entry, and it takes longer than one tick of the
// runtime's sysmon thread (20 µs), so sysmon takes the P away from the
// writer in almost every commit (waking another thread to run it, and
// when the fsync returns the writer parks its thread and waits for a P).
// A P taken away from a syscall also resets sysmon's back-off: with a
// commit every millisecond sysmon then never slows down from polling every
// 20 µs. In CPU profiles of bastiond under the full-stack benchmark (50
// devices) sysmon's polling was 12 % of the gateway's CPU, and the hand-off
// of the P and the thread wake-ups several percent more. The writer's
// fsync is the one long syscall the gateway makes per commit; making it
// without the runtime's entry keeps the P (the other P runs everything
// else) and lets sysmon back off (4.7 % of the CPU after).
//
// What it costs: for the fsync's duration the writer's P runs nothing else
// (its other goroutines are taken over by the other P), and a
// stop-the-world of the garbage collector waits for the fsync to return.
// Both are bounded by the fsync time, which is why a slow disk (a mean
// above rawSyncBelow, e.g. an SD card) or a single P (everything would
// stop for the fsync) keeps the runtime's entry.
func useRawSync(procs int, meanFsync time.Duration) bool {
	return procs >= 2 && meanFsync > 0 && meanFsync < rawSyncBelow
}

// defaultSync is the commit's fsync when Options.Sync is not set. Only the
// writer goroutine calls it (and only it writes fsyncEWMA and q.aio).
//
// With a single P it is submitted asynchronously on Linux and waited for
// on the poller (aioFsync): no thread and no P wait for the disk, where a
// raw fsync would stop the whole process and one through the runtime's
// entry makes sysmon take the P away and poll (useRawSync). With two Ps
// or more the raw fsync is quicker: the kernel's worker that runs an
// asynchronous fsync must first get a CPU, which on a busy box added
// 150–200 µs to a commit. Where native AIO is missing or refused the
// queue falls back, once and for good, to a blocking fsync.
func (q *Queue) defaultSync(f *os.File) error {
	if useAIO(runtime.GOMAXPROCS(0)) && !q.noAIO {
		if q.aio == nil {
			a, err := newAIOFsync()
			if err != nil {
				q.aioFallback(err)
			} else {
				q.aio = a
			}
		}
		if q.aio != nil {
			err := q.aio.fsync(f)
			if !errors.Is(err, errAIOUnsupported) {
				return err
			}
			q.aioFallback(err)
		}
	}
	if q.rawIO() {
		return rawFsync(f)
	}
	return f.Sync()
}

// useAIO reports whether the commit's fsync should be asynchronous: with
// one P (see defaultSync).
func useAIO(procs int) bool { return procs == 1 }

// aioFallback turns the asynchronous fsync off for this queue. The writer
// goroutine only.
func (q *Queue) aioFallback(why error) {
	if q.aio != nil {
		q.aio.close()
		q.aio = nil
	}
	q.noAIO = true
	q.log.Info("queue: fsync blocks a thread (no asynchronous fsync here)", "reason", why)
}

// rawIO reports whether the queue's system calls go raw now (useRawSync).
// Caller holds q.mu or is the writer goroutine (the only one that changes
// fsyncEWMA, under q.mu).
func (q *Queue) rawIO() bool {
	return useRawSync(runtime.GOMAXPROCS(0), q.fsyncEWMA)
}

// writeAt is f.WriteAt, raw when rawIO.
func (q *Queue) writeAt(f *os.File, b []byte, off int64) (int, error) {
	if q.opts.writeAt != nil {
		return q.opts.writeAt(f, b, off)
	}
	if rawOffsets && len(b) > 0 && q.rawIO() {
		return rawPwrite(f, b, off)
	}
	return f.WriteAt(b, off)
}

// readAt is f.ReadAt, raw if raw (rawIO's answer, taken under q.mu: the
// read itself may be made without it).
func (q *Queue) readAt(f *os.File, b []byte, off int64, raw bool) (int, error) {
	if q.opts.readAt != nil {
		return q.opts.readAt(f, b, off)
	}
	if rawOffsets && len(b) > 0 && raw {
		return rawPread(f, b, off)
	}
	return f.ReadAt(b, off)
}

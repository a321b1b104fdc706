package mqtt

import (
	"sync"
	"time"
)

// retainRate bounds how often each device's retained messages are written
// to the store: a bucket of burst writes per device that refills by one
// every every (Config.RetainedBurst, RetainedEvery). Each write is a synced
// bbolt transaction under the store's one write lock (gateway/store), so a
// device replacing a retained message in a loop wore the flash and kept
// the store's other writers (devices, credentials, revocations, the audit
// log) waiting behind its writes, as fast as the disk synced them.
//
// The bucket is the device's, not its session's: a device reconnecting to
// start a new session would otherwise start with a full one. It is kept as
// the time it is full again (tat, GCRA's theoretical arrival time), so a
// device whose bucket is full needs no entry, and entries are dropped once
// full (sweep): the map holds the devices that wrote a retained message in
// the last burst·every, each authenticated.
//
// Times come from Config.Now. time.Now's readings carry the monotonic
// clock, which Sub and Before use, so a step of the wall clock (a box that
// booted without one and then set it) neither empties nor fills a bucket.
type retainRate struct {
	burst int
	every time.Duration

	mu      sync.Mutex
	tat     map[string]time.Time // device → when its bucket is full again
	sweepAt int                  // sweep when tat holds more entries than this
}

// retainSweepMin is the size under which retainRate does not sweep.
const retainSweepMin = 64

func newRetainRate(burst int, every time.Duration) *retainRate {
	return &retainRate{burst: burst, every: every, tat: map[string]time.Time{}, sweepAt: retainSweepMin}
}

// allow reports whether device may write a retained message at now, and
// if so takes the write from its bucket.
func (r *retainRate) allow(now time.Time, device string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	tat, ok := r.tat[device]
	if !ok || tat.Before(now) {
		tat = now
	}
	// The bucket holds burst writes: it has room for one more while it is
	// full again within burst-1 intervals.
	if tat.Sub(now) > time.Duration(r.burst-1)*r.every {
		return false
	}
	r.tat[device] = tat.Add(r.every)
	if len(r.tat) > r.sweepAt {
		r.sweep(now)
	}
	return true
}

// sweep drops the entries of full buckets, and sets the next sweep at
// twice what is left, so that a sweep's cost is spread over as many
// allows as it looked at.
func (r *retainRate) sweep(now time.Time) {
	for dev, tat := range r.tat {
		if !tat.After(now) {
			delete(r.tat, dev)
		}
	}
	r.sweepAt = max(retainSweepMin, 2*len(r.tat))
}

package upstream

import (
	"sync"
	"sync/atomic"
)

// stalledDevices are the devices whose oldest queued message the link can
// neither send nor park (sendRun.stall), each with the run that found it
// so and that message's seq. The link refuses their new messages (gate)
// until a run gets past that message: they would only wait behind it, and
// a device that keeps sending would fill the queue for every device.
//
// A device stays stalled between runs (the link down, a pause): its
// message is still at the head. A later run ends the stall once it has
// read past that message without stalling on it again (passed): it sent,
// parked or withheld it, or did not find it (the queue dropped it as
// unreadable). A stall that a later run did not end would refuse the
// device for good if it had nothing else queued.
type stalledDevices struct {
	n  atomic.Int32 // len(by), for has without the lock
	mu sync.Mutex
	by map[string]stalledAt
}

type stalledAt struct {
	run *sendRun
	seq uint64
}

// has reports whether dev is stalled. Nothing stalled (the usual case) is
// one atomic load: gate calls it for every message.
func (s *stalledDevices) has(dev string) bool {
	if s.n.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.by[dev]
	return ok
}

// add records that run r stalled on dev's message seq.
func (s *stalledDevices) add(dev string, r *sendRun, seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if at, ok := s.by[dev]; ok && at.run == r && at.seq <= seq {
		return // r stalled dev on an earlier message already
	}
	if s.by == nil {
		s.by = map[string]stalledAt{}
	}
	s.by[dev] = stalledAt{run: r, seq: seq}
	s.n.Store(int32(len(s.by)))
}

// passed records that run r has read the queue up to seq: the stalls
// earlier runs found on messages up to seq, which r did not stall on
// again, are over.
func (s *stalledDevices) passed(r *sendRun, seq uint64) {
	if s.n.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for dev, at := range s.by {
		if at.run != r && at.seq <= seq {
			delete(s.by, dev)
		}
	}
	s.n.Store(int32(len(s.by)))
}

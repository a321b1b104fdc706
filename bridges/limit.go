package bridges

import (
	"container/list"
	"net/netip"
	"sync"
)

// SourceLimit bounds the slots held at once per source address, per IPv6
// /64 (Source.Prefix: a link-local one per interface) and in all. The
// transports hold one for every connection that has cost the gateway
// state but has not proved who it is yet: coap a DTLS handshake in
// flight, mqtt a connection before its CONNECT is accepted. Each such
// connection holds a goroutine and its handshake's state until it ends or
// its timeout runs out, so neither one host nor all hosts together may
// hold more of them than the gateway can spare. T is what the transport
// ends when a slot is evicted (Slot.Value).
//
// Over its address's bound a new slot is refused: that address is the
// host itself.
//
// Why per /64: a host on an IPv6 link can use any address of the link's
// /64 (SLAAC, privacy addresses), so a bound per address alone is one it
// escapes by changing address. Over its /64's bound the /64's oldest slot
// is evicted to make room, not the new one refused: the /64 is shared by
// every IPv6 device of the link, and refusing there let one host of the
// link that holds a few dozen slots (from as many addresses) and then
// stalls keep out every other device of its /64 for as long as it liked.
// Evicting the oldest, it pushes out only slots of its own /64 older than
// its newest, and a device holds its slot for milliseconds: to push one
// out, the host has to take more than the /64's bound within that time.
//
// IPv4 is counted per address only, and the /64's bound never applies to
// it: a host has the addresses it was given. On a LAN it can still claim
// many unused ones of its subnet (answering ARP for them), each a source
// of its own, and so alone reach the total, as many hosts together can;
// what bounds it then is the total, not a bound per host (there is no
// IPv4 grouping).
//
// The total bounds the state all sources together hold, whatever their
// addresses. Over it the oldest slot of all is evicted, for the same
// reason as per /64: refused, a host claiming a few dozen IPv4 addresses
// kept every device out with stalled connections; evicting the oldest, it
// must take more than the total within a device's handshake to push that
// one out.
//
// A new slot evicts at most one: its /64's oldest if the /64 is at its
// bound, or else the oldest of all if all are. After a /64's eviction the
// total has room (the evicted slot was counted in it too), so the total
// need not be looked at again.
//
// Release is idempotent; a slot's holder that succeeded Claims it
// instead, so that it cannot be evicted afterwards, and learns if it was
// evicted already. The zero SourceLimit is not usable: NewSourceLimit.
type SourceLimit[T any] struct {
	perSource, perPrefix, total int

	mu       sync.Mutex
	sources  map[netip.Addr]int
	prefixes map[Prefix]*list.List // of *Slot[T], oldest first
	all      list.List             // of *Slot[T], oldest first
}

// NewSourceLimit bounds slots to perSource per address, perPrefix per
// IPv6 /64 and total in all; each must be at least 1.
func NewSourceLimit[T any](perSource, perPrefix, total int) *SourceLimit[T] {
	return &SourceLimit[T]{perSource: perSource, perPrefix: perPrefix, total: total,
		sources: map[netip.Addr]int{}, prefixes: map[Prefix]*list.List{}}
}

// Slot is one place in a SourceLimit: taken once (Take), then given back
// once (Release or Claim), by its holder or by an eviction.
type Slot[T any] struct {
	src   Source
	value T
	// Under the limit's mu.
	elem      *list.Element // in its /64's list (nil: IPv4, or not held)
	allElem   *list.Element // in the list of all (nil: not held)
	evictedBy Bound         // BoundNone unless evicted for a newer slot
}

// NewSlot is a slot for a connection from src; v is what its holder ends
// if the slot is evicted.
func NewSlot[T any](src Source, v T) *Slot[T] { return &Slot[T]{src: src, value: v} }

// Source is where the slot's connection comes from.
func (s *Slot[T]) Source() Source { return s.src }

// Value is what the slot's holder ends if the slot is evicted.
func (s *Slot[T]) Value() T { return s.value }

// Bound is one of a SourceLimit's bounds.
type Bound int

const (
	BoundNone   Bound = iota
	BoundSource       // the source address's: a new slot over it is refused
	BoundPrefix       // the source's IPv6 /64's: the /64's oldest is evicted
	BoundTotal        // all sources': the oldest of all is evicted
)

func (b Bound) String() string {
	switch b {
	case BoundSource:
		return "source"
	case BoundPrefix:
		return "prefix"
	case BoundTotal:
		return "total"
	}
	return "none"
}

// Take holds s if its address is under its bound, and otherwise reports
// false and holds nothing. If s's /64 is at its bound, the /64's oldest
// slot is evicted for s, or else, if all are at the total, the oldest of
// all; that one is returned, released, with the bound that evicted it: the
// caller ends its connection.
func (l *SourceLimit[T]) Take(s *Slot[T]) (ok bool, evicted *Slot[T], by Bound) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sources[s.src.Addr] >= l.perSource {
		return false, nil, BoundNone
	}
	q := l.prefixes[s.src.Prefix]
	switch {
	case s.src.Prefix.IsValid() && q != nil && q.Len() >= l.perPrefix:
		evicted, by = q.Front().Value.(*Slot[T]), BoundPrefix
	case l.all.Len() >= l.total:
		evicted, by = l.all.Front().Value.(*Slot[T]), BoundTotal
	}
	if evicted != nil {
		l.releaseLocked(evicted)
		evicted.evictedBy = by
	}
	l.sources[s.src.Addr]++
	if s.src.Prefix.IsValid() {
		if q = l.prefixes[s.src.Prefix]; q == nil {
			q = list.New()
			l.prefixes[s.src.Prefix] = q
		}
		s.elem = q.PushBack(s)
	}
	s.allElem = l.all.PushBack(s)
	return true, evicted, by
}

// Release gives s back if it is held (so at most once; later calls do
// nothing), and reports whether it was evicted for a newer slot instead.
func (l *SourceLimit[T]) Release(s *Slot[T]) (evicted bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked(s)
	return s.evictedBy != BoundNone
}

// Claim gives s back for a connection that has proved who it is, so that
// no newer slot evicts it from then on, and reports false, releasing
// nothing, if one evicted it already: the connection is not to be
// accepted then (its eviction was counted as a refusal, and its holder
// was told to end it).
func (l *SourceLimit[T]) Claim(s *Slot[T]) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s.evictedBy != BoundNone {
		return false
	}
	l.releaseLocked(s)
	return true
}

func (l *SourceLimit[T]) releaseLocked(s *Slot[T]) {
	if s.allElem == nil {
		return
	}
	if l.sources[s.src.Addr] <= 1 {
		delete(l.sources, s.src.Addr)
	} else {
		l.sources[s.src.Addr]--
	}
	if s.elem != nil {
		q := l.prefixes[s.src.Prefix]
		q.Remove(s.elem)
		s.elem = nil
		if q.Len() == 0 {
			delete(l.prefixes, s.src.Prefix)
		}
	}
	l.all.Remove(s.allElem)
	s.allElem = nil
}

// Held reports whether s holds a place now: taken, and neither given back
// nor evicted.
func (l *SourceLimit[T]) Held(s *Slot[T]) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return s.allElem != nil
}

// EvictedBy is the bound that evicted s, BoundNone if none did.
func (l *SourceLimit[T]) EvictedBy(s *Slot[T]) Bound {
	l.mu.Lock()
	defer l.mu.Unlock()
	return s.evictedBy
}

// Len is how many slots are held now.
func (l *SourceLimit[T]) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.all.Len()
}

// From is how many slots the address addr holds now.
func (l *SourceLimit[T]) From(addr netip.Addr) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sources[addr]
}

// In is how many slots the /64 p holds now (0 for the zero Prefix: IPv4
// is not counted per prefix).
func (l *SourceLimit[T]) In(p Prefix) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if q := l.prefixes[p]; q != nil {
		return q.Len()
	}
	return 0
}

// Tracked is how many addresses and /64s l keeps a count for: only those
// holding a slot, so none once every slot is given back.
func (l *SourceLimit[T]) Tracked() (addrs, prefixes int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.sources), len(l.prefixes)
}

// Values are the Values of the slots held now, oldest first.
func (l *SourceLimit[T]) Values() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	vs := make([]T, 0, l.all.Len())
	for e := l.all.Front(); e != nil; e = e.Next() {
		vs = append(vs, e.Value.(*Slot[T]).value)
	}
	return vs
}

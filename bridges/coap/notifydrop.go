package coap

import (
	"net"
	"net/netip"
	"sync"
)

// notifyWrites tells session.send whether the datagram of the command
// notification it wrote was dropped. A listener's socket never makes a
// write wait for room (pion-dtls patch (52)): a datagram it has no room
// for is dropped and the write reports it sent, as a datagram lost on the
// way would be; only writeDropped hears of it, on the writer's goroutine
// before the write returns, with the address the datagram was for. So
// send registers the device's address before writing (begin), a drop to
// that address meanwhile is charged to it (drop), and send asks after
// writing (end). Without it a dropped notification was counted as a
// command sent and told the hub a session received it.
//
// A datagram is known by its address only: another datagram to the same
// device dropped while a notification to it is being written (an answer
// to one of its requests written at that moment, with the socket full) is
// taken for the notification's. The error goes one way: a dropped
// notification is never counted as sent.
type notifyWrites struct {
	mu sync.Mutex
	m  map[netip.AddrPort]notifyWrite
}

type notifyWrite struct {
	writers int // notifications being written to the address now
	dropped int // datagrams to it dropped meanwhile, not yet charged to one
}

// begin marks a notification to `to` as being written.
func (w *notifyWrites) begin(to netip.AddrPort) {
	w.mu.Lock()
	if w.m == nil {
		w.m = map[netip.AddrPort]notifyWrite{}
	}
	e := w.m[to]
	e.writers++
	w.m[to] = e
	w.mu.Unlock()
}

// end ends what begin started and reports whether the notification's
// datagram was dropped.
func (w *notifyWrites) end(to netip.AddrPort) (dropped bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	e := w.m[to]
	if e.dropped > 0 {
		e.dropped--
		dropped = true
	}
	if e.writers--; e.writers <= 0 {
		delete(w.m, to)
	} else {
		w.m[to] = e
	}
	return dropped
}

// drop charges a datagram dropped on its way to `to` to a notification
// being written there, if there is one. It never blocks for longer than
// the map update (writeDropped runs on the writer's goroutine).
func (w *notifyWrites) drop(to netip.AddrPort) {
	w.mu.Lock()
	if e, ok := w.m[to]; ok && e.dropped < e.writers {
		e.dropped++
		w.m[to] = e
	}
	w.mu.Unlock()
}

// notifyAddr is addr as the listener names it to writeDropped, an IPv4
// peer as an IPv4 address whether the socket reads it mapped or not; the
// zero AddrPort for an address that is not UDP.
func notifyAddr(addr net.Addr) netip.AddrPort {
	u, ok := addr.(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	return unmapped(u.AddrPort())
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Package connlimit bounds the connections a TCP listener of one of the
// gateway's own HTTPS servers (firmware, console) holds open: in all, and
// among them those not claimed yet, per source address, per IPv6 /64 and
// in all (a bridges.SourceLimit). A connection is claimed by its server
// once whoever is on it has proved who they are (a device certificate, an
// administrator's session): claimed, it is never closed for room. The
// package never reads what a connection carries and logs nothing; what it
// closes is told to its caller's Events.
package connlimit

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"sync/atomic"

	"github.com/bastion-iot/bastion/bridges"
)

// Listener bounds the connections of the net.Listener it wraps: at most
// New's maxOpen open at once, and among them those not claimed yet.
//
// Each connection holds a place in unclaimed (a bridges.SourceLimit: why
// it counts per address, per IPv6 /64 and in all, refusing past the first
// and closing the oldest past the others, is said there) from its accept
// until it is claimed (Claim) or closed. Without it one LAN host could
// hold every place by opening connections and sending nothing (or nothing
// that proves who it is), and open them again as its server's timeouts
// closed them. TCP cannot be spoofed, so an address over its bound is the
// host itself: its new connection is closed at once. Whoever proves who
// they are does so within milliseconds of their connection's accept, so
// what the closing of the oldest pushes out is connections that stall.
//
// The bounds of unclaimed are looked at first, and a connection they close
// gives its place among the open ones back. When every place is still
// taken, a new connection closes the oldest one not claimed yet, never a
// claimed one (a device's download, an administrator's page); only when
// all are claimed is the new one closed. Were the new one closed whenever
// all places are taken, hosts that stall connections in the places the
// claimed ones leave free would keep every newcomer out for as long as
// they held them, and again as they reopened them.
//
// Each connection closed for room is passed to its Events (counted and
// logged there) before it is closed.
type Listener struct {
	net.Listener
	slots     chan struct{} // one per open connection
	unclaimed *bridges.SourceLimit[net.Conn]
	ev        Events
}

// Events are told of each connection a Listener closes for room, before it
// is closed. All three are required.
type Events struct {
	// Limited is told of a connection closed by a bound of unclaimed: by
	// bridges.BoundSource a new one (its address holds its bound), by
	// BoundPrefix or BoundTotal the oldest of its /64 or of all.
	Limited func(c net.Conn, src bridges.Source, by bridges.Bound)
	// PushedOut is told of the oldest connection not claimed, closed for
	// a new one, every place being taken.
	PushedOut func(c net.Conn)
	// Refused is told of a new connection closed, every open one being
	// claimed.
	Refused func(c net.Conn)
}

// New bounds ln to maxOpen connections open at once, and those not
// claimed yet to the bounds of unclaimed (which the caller keeps, to tell
// its counts in the lines it logs).
func New(ln net.Listener, maxOpen int, unclaimed *bridges.SourceLimit[net.Conn], ev Events) *Listener {
	return &Listener{Listener: ln, slots: make(chan struct{}, maxOpen), unclaimed: unclaimed, ev: ev}
}

// Accept returns the next connection that fits, closing any for room as
// it goes.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		src := bridges.SourceOf(c.RemoteAddr())
		u := &conn{Conn: c, unclaimed: l.unclaimed, slots: l.slots}
		u.slot = bridges.NewSlot[net.Conn](src, u)
		ok, evicted, by := l.unclaimed.Take(u.slot)
		if !ok {
			l.ev.Limited(c, src, bridges.BoundSource)
			c.Close()
			continue
		}
		if evicted != nil {
			// Its reads fail with ErrEvicted, which its server's error
			// log does not count again.
			l.ev.Limited(evicted.Value(), evicted.Source(), by)
			evicted.Value().Close()
		}
		if !l.open(u) {
			l.ev.Refused(c)
			l.unclaimed.Release(u.slot)
			c.Close()
			continue
		}
		return u, nil
	}
}

// open takes a place among the open connections for u, closing the
// oldest connection not claimed yet (other than u) if every place is
// taken, and reports false if all are claimed.
func (l *Listener) open(u *conn) bool {
	select {
	case l.slots <- struct{}{}:
		return true
	default:
	}
	// At most the total of unclaimed, oldest first.
	for _, v := range l.unclaimed.Values() {
		o := v.(*conn)
		if o == u || !o.state.CompareAndSwap(stateUnclaimed, statePushedOut) {
			continue // claimed or closed since
		}
		l.ev.PushedOut(o)
		o.Close() // gives its place back before it returns
		select {
		case l.slots <- struct{}{}:
			return true
		default:
			return false
		}
	}
	return false
}

// ErrEvicted is what the reads and writes of a connection closed for a
// newer one return, so that the failed handshake net/http logs for it is
// known as one the Listener's Events were told of already.
var ErrEvicted = errors.New("closed to make room for a newer connection")

// A conn's state: it moves from stateUnclaimed once, to one of the others.
const (
	stateUnclaimed int32 = iota
	stateClaimed
	statePushedOut // closed by Listener.open for a newer connection
	stateClosed    // by its holder
)

// conn is a connection a Listener accepted: it holds a place among the
// open connections until it is closed, and one in unclaimed until it is
// claimed or closed.
type conn struct {
	net.Conn
	unclaimed *bridges.SourceLimit[net.Conn]
	slot      *bridges.Slot[net.Conn]
	slots     chan struct{}
	state     atomic.Int32
	once      sync.Once
}

func (c *conn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	return n, c.why(err)
}

func (c *conn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	return n, c.why(err)
}

func (c *conn) why(err error) error {
	if err != nil && (c.state.Load() == statePushedOut || c.unclaimed.EvictedBy(c.slot) != bridges.BoundNone) {
		return ErrEvicted
	}
	return err
}

// Close closes the connection and gives its places back (each at most
// once: net/http and crypto/tls may both close it, and the Listener too).
func (c *conn) Close() error {
	c.state.CompareAndSwap(stateUnclaimed, stateClosed)
	err := c.Conn.Close()
	c.unclaimed.Release(c.slot)
	c.once.Do(func() { <-c.slots })
	return err
}

// claim gives c's place among the unclaimed back for good: no newer
// connection can close it from then on. One closed (or closing) already
// has nothing to give back.
func (c *conn) claim() {
	if c.state.CompareAndSwap(stateUnclaimed, stateClaimed) {
		c.unclaimed.Claim(c.slot)
	}
}

// of is the connection of a Listener that c is, or that the *tls.Conn c
// runs on (what net/http serves), or nil.
func of(c net.Conn) *conn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	u, _ := c.(*conn)
	return u
}

// Claim marks c, a connection of a Listener or a *tls.Conn on one, as
// proved to be whose it claims to be: it gives its place among the
// unclaimed back, and no newer connection closes it for room. Anything
// else, and a connection closed already, is left as it is.
func Claim(c net.Conn) {
	if u := of(c); u != nil {
		u.claim()
	}
}

// Claimed reports whether c (as for Claim) has been claimed.
func Claimed(c net.Conn) bool {
	u := of(c)
	return u != nil && u.state.Load() == stateClaimed
}

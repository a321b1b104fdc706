// Package connlimit bounds the connections a TCP listener of one of the
// gateway's own HTTPS servers (firmware, console) holds open: in all, and
// among them those not claimed yet, per source address, per IPv6 /64 and
// in all (a bridges.SourceLimit). A connection is claimed by its server
// once whoever is on it has proved who they are (a device certificate, an
// administrator's session): claimed, it is never closed for room, and at
// most a bound of them per source address are claimed. The
// package never reads what a connection carries and logs nothing; what it
// closes is told to its caller's Events.
package connlimit

import (
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
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
// Claimed connections are bounded per source address too (New's
// maxClaimedPerAddr): past it a connection stays unclaimed, and can be
// pushed out. Proving who one is takes only an account (any role, any API
// token on the console), and claimed places are never given back for room:
// without this bound one account could claim every place, one request each
// per idle timeout keeping them, and every newcomer, an administrator's
// too, would be closed. A connection is unclaimed again (Unclaim) when a
// request on it no longer proves anything (logged out, account or token
// deleted).
//
// Each connection closed for room is passed to its Events (counted and
// logged there) before it is closed.
type Listener struct {
	net.Listener
	slots      chan struct{} // one per open connection
	unclaimed  *bridges.SourceLimit[net.Conn]
	maxClaimed int // per source address
	ev         Events

	// mu guards claimed and each conn's slot and state changes: a claim
	// counted is one whose conn is in stateClaimed.
	mu      sync.Mutex
	claimed map[netip.Addr]int // only addresses with a claimed connection
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

// New bounds ln to maxOpen connections open at once, the claimed ones to
// maxClaimedPerAddr per source address, and those not claimed to the
// bounds of unclaimed (which the caller keeps, to tell its counts in the
// lines it logs).
func New(ln net.Listener, maxOpen, maxClaimedPerAddr int, unclaimed *bridges.SourceLimit[net.Conn], ev Events) *Listener {
	return &Listener{Listener: ln, slots: make(chan struct{}, maxOpen), unclaimed: unclaimed,
		maxClaimed: maxClaimedPerAddr, ev: ev, claimed: map[netip.Addr]int{}}
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
		u := &conn{Conn: c, l: l, src: src}
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
		if o == u || !l.pushOut(o) {
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

// pushOut marks o, if it is still unclaimed, as closed for a newer
// connection.
func (l *Listener) pushOut(o *conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return o.state.CompareAndSwap(stateUnclaimed, statePushedOut)
}

// ErrEvicted is what the reads and writes of a connection closed for a
// newer one return, so that the failed handshake net/http logs for it is
// known as one the Listener's Events were told of already.
var ErrEvicted = errors.New("closed to make room for a newer connection")

// A conn's state: from stateUnclaimed to stateClaimed and back (Unclaim),
// and from either once to one of the others. Changed under its Listener's
// mu.
const (
	stateUnclaimed int32 = iota
	stateClaimed
	statePushedOut // closed by Listener.open for a newer connection
	stateClosed    // by its holder
)

// conn is a connection a Listener accepted: it holds a place among the
// open connections until it is closed, and one in unclaimed while it is
// not claimed and open.
type conn struct {
	net.Conn
	l     *Listener
	src   bridges.Source
	slot  *bridges.Slot[net.Conn] // under l.mu: a new one each time it is unclaimed
	state atomic.Int32
	once  sync.Once
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
	if err == nil {
		return nil
	}
	c.l.mu.Lock()
	slot := c.slot
	c.l.mu.Unlock()
	if c.state.Load() == statePushedOut || c.l.unclaimed.EvictedBy(slot) != bridges.BoundNone {
		return ErrEvicted
	}
	return err
}

// Close closes the connection and gives its places back (each at most
// once: net/http and crypto/tls may both close it, and the Listener too).
func (c *conn) Close() error {
	l := c.l
	l.mu.Lock()
	switch c.state.Load() {
	case stateClaimed:
		l.dropClaimLocked(c.src.Addr)
		c.state.Store(stateClosed)
	case stateUnclaimed:
		c.state.Store(stateClosed)
	}
	slot := c.slot
	l.mu.Unlock()
	err := c.Conn.Close()
	l.unclaimed.Release(slot)
	c.once.Do(func() { <-l.slots })
	return err
}

func (l *Listener) dropClaimLocked(a netip.Addr) {
	if l.claimed[a] <= 1 {
		delete(l.claimed, a)
	} else {
		l.claimed[a]--
	}
}

// claim gives c's place among the unclaimed back: no newer connection can
// close it while it stays claimed. It reports false, and c stays as it
// is, if its address holds its bound of claimed connections already, or c
// is closed (or being closed for room).
func (c *conn) claim() bool {
	l := c.l
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case c.state.Load() == stateClaimed:
		return true
	case c.state.Load() != stateUnclaimed || l.claimed[c.src.Addr] >= l.maxClaimed:
		return false
	case !l.unclaimed.Claim(c.slot):
		return false // evicted: its Listener is closing it
	}
	c.state.Store(stateClaimed)
	l.claimed[c.src.Addr]++
	return true
}

// unclaim puts a claimed c back among the unclaimed, in a new place (the
// newest), as if it had just been accepted. It reports false, c staying
// claimed, if its address holds its bound of unclaimed ones: its caller
// closes it.
func (c *conn) unclaim() bool {
	l := c.l
	l.mu.Lock()
	if c.state.Load() != stateClaimed {
		l.mu.Unlock()
		return true
	}
	slot := bridges.NewSlot[net.Conn](c.src, c)
	ok, evicted, by := l.unclaimed.Take(slot)
	if ok {
		l.dropClaimLocked(c.src.Addr)
		c.slot = slot
		c.state.Store(stateUnclaimed)
	}
	l.mu.Unlock()
	if evicted != nil {
		l.ev.Limited(evicted.Value(), evicted.Source(), by)
		evicted.Value().Close()
	}
	return ok
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
// unclaimed back, and no newer connection closes it for room. It reports
// whether c is claimed: not if its source address holds its bound of
// claimed connections (c stays unclaimed), nor if c is closed. Anything
// else is left as it is.
func Claim(c net.Conn) bool {
	if u := of(c); u != nil {
		return u.claim()
	}
	return false
}

// Unclaim takes back Claim, for a connection on which what had been
// proved no longer is (a session ended, an account or token deleted): c
// takes a place among the unclaimed again, as the newest, and can be
// pushed out from then on. It reports false if c's source address holds
// its bound of unclaimed connections: c then stays claimed, and its
// caller is to close it (after the answer it is writing). A connection
// not claimed, or not a Listener's, is left as it is (true).
func Unclaim(c net.Conn) bool {
	if u := of(c); u != nil {
		return u.unclaim()
	}
	return true
}

// Claimed reports whether c (as for Claim) has been claimed.
func Claimed(c net.Conn) bool {
	u := of(c)
	return u != nil && u.state.Load() == stateClaimed
}

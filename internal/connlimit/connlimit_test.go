package connlimit

import (
	"crypto/tls"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/bridges"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// dialFrom connects to addr from the loopback address from; the
// connection is closed when the test ends.
func dialFrom(t *testing.T, from, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestListener: the bounds, in the order they are looked at, with 3
// places, 1 connection not claimed per address and 2 in all. Each line of
// want is what one new connection causes. (The firmware HTTPS listener's
// TestFirmwareConnLimit, from before the listener was shared with the
// console.)
func TestListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan string, 16)
	host := func(c net.Conn) string { return c.RemoteAddr().(*net.TCPAddr).IP.String() }
	l := New(ln, 3, 3, bridges.NewSourceLimit[net.Conn](1, 32, 2), Events{
		Limited: func(c net.Conn, _ bridges.Source, by bridges.Bound) {
			events <- "limited by " + by.String() + ": " + host(c)
		},
		PushedOut: func(c net.Conn) { events <- "pushed out: " + host(c) },
		Refused:   func(c net.Conn) { events <- "refused: " + host(c) },
	})
	accepted := make(chan *conn, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			events <- "accepted: " + host(c)
			accepted <- c.(*conn)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	servers := map[string]*conn{}
	t.Cleanup(func() {
		for _, c := range servers {
			c.Close()
		}
	})
	// dial connects from the loopback address from, checks what the
	// listener does, in order, and returns the client's end.
	dial := func(from string, want ...string) net.Conn {
		t.Helper()
		c := dialFrom(t, from, ln.Addr().String())
		var got []string
		for range want {
			select {
			case e := <-events:
				got = append(got, e)
			case <-time.After(10 * time.Second):
				t.Fatalf("connection from %s: %q within 10s, want %q", from, got, want)
			}
			if strings.HasPrefix(got[len(got)-1], "accepted: ") {
				servers[from] = <-accepted
			}
			if got[len(got)-1] != want[len(got)-1] {
				break
			}
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("connection from %s (-want +got):\n%s", from, diff)
		}
		return c
	}
	closed := func(c net.Conn) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Errorf("connection from %s: read %d bytes, %v; want it closed", c.LocalAddr(), n, err)
		}
	}

	dial("127.0.0.1", "accepted: 127.0.0.1")
	Claim(servers["127.0.0.1"])
	c2 := dial("127.0.0.2", "accepted: 127.0.0.2")
	dial("127.0.0.3", "accepted: 127.0.0.3")
	// All 3 places taken, 2 not claimed: the oldest of those is closed
	// for the total's bound, which gives its place back.
	c4 := dial("127.0.0.4", "limited by total: 127.0.0.2", "accepted: 127.0.0.4")
	closed(c2)
	// 127.0.0.4 holds its address's bound: refused, though 127.0.0.3
	// could be pushed out.
	closed(dial("127.0.0.4", "limited by source: 127.0.0.4"))
	// Under the total but no place left: the oldest not claimed is pushed
	// out, not 127.0.0.1, claimed before it.
	Claim(servers["127.0.0.3"])
	dial("127.0.0.5", "pushed out: 127.0.0.4", "accepted: 127.0.0.5")
	closed(c4)
	if _, err := servers["127.0.0.4"].Read(make([]byte, 1)); err != ErrEvicted {
		t.Errorf("pushed-out connection's read: %v, want ErrEvicted (counted once, not again as a failed handshake)", err)
	}
	// Every open connection claimed: the new one is refused.
	Claim(servers["127.0.0.5"])
	closed(dial("127.0.0.6", "refused: 127.0.0.6"))
	// Closed twice (as net/http and crypto/tls may), a connection gives
	// one place back.
	servers["127.0.0.3"].Close()
	servers["127.0.0.3"].Close()
	dial("127.0.0.7", "accepted: 127.0.0.7")
	Claim(servers["127.0.0.7"])
	dial("127.0.0.8", "refused: 127.0.0.8")
	// The only one not claimed is pushed out, however new.
	servers["127.0.0.1"].Close()
	c9 := dial("127.0.0.9", "accepted: 127.0.0.9")
	dial("127.0.0.10", "pushed out: 127.0.0.9", "accepted: 127.0.0.10")
	closed(c9)
	// Claimed once pushed out, it stays out: the pushing out counted it.
	Claim(servers["127.0.0.9"])
	if Claimed(servers["127.0.0.9"]) {
		t.Error("pushed-out connection claimed: Claimed true, want false")
	}
	if got := servers["127.0.0.9"].state.Load(); got != statePushedOut {
		t.Errorf("pushed-out connection claimed: state %d, want statePushedOut", got)
	}
	if got := l.unclaimed.Len(); got != 1 {
		t.Errorf("not claimed = %d, want 1 (127.0.0.10)", got)
	}
}

// TestClaimThroughTLS: a *tls.Conn on one of a Listener's connections (what
// net/http serves, and gives its ConnState and ConnContext) is claimed
// through to it; anything else is left alone.
func TestClaimThroughTLS(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	none := func(net.Conn) {}
	unclaimed := bridges.NewSourceLimit[net.Conn](8, 32, 64)
	l := New(ln, 4, 4, unclaimed, Events{Limited: func(net.Conn, bridges.Source, bridges.Bound) {}, PushedOut: none, Refused: none})
	defer l.Close()
	dialFrom(t, "127.0.0.1", ln.Addr().String())
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc := tls.Server(c, &tls.Config{})
	if Claimed(tc) {
		t.Fatal("Claimed before Claim")
	}
	Claim(tc)
	if !Claimed(tc) || !Claimed(c) {
		t.Errorf("after Claim of the *tls.Conn: Claimed(tls) %v, Claimed(conn) %v; want both true", Claimed(tc), Claimed(c))
	}
	if got := unclaimed.Len(); got != 0 {
		t.Errorf("not claimed = %d, want 0", got)
	}
	other := tls.Server(dialFrom(t, "127.0.0.1", ln.Addr().String()), &tls.Config{})
	Claim(other) // not one of a Listener's: nothing to do, no panic
	if Claimed(other) {
		t.Error("a connection of no Listener reads as claimed")
	}
}

// TestClaimedPerAddr: an address claims at most maxClaimedPerAddr
// connections; one more stays unclaimed (and so can be pushed out), and
// closing or unclaiming a claimed one makes room for it. Unclaim puts a
// connection back among the unclaimed, or reports false when its address
// holds its bound of those.
func TestClaimedPerAddr(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	none := func(net.Conn) {}
	unclaimed := bridges.NewSourceLimit[net.Conn](2, 32, 64)
	l := New(ln, 8, 2, unclaimed, Events{Limited: func(net.Conn, bridges.Source, bridges.Bound) {}, PushedOut: none, Refused: none})
	defer l.Close()
	accept := func(from string) net.Conn {
		t.Helper()
		dialFrom(t, from, ln.Addr().String())
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// Each accepted once the ones before it are claimed: accept blocks
	// on a connection its address's unclaimed bound closes.
	a1 := accept("127.0.0.1")
	if !Claim(a1) {
		t.Fatal("claim 1 of 127.0.0.1: false, want true")
	}
	a2 := accept("127.0.0.1")
	if !Claim(a2) {
		t.Fatal("claim 2 of 127.0.0.1: false, want true")
	}
	a3 := accept("127.0.0.1")
	if Claim(a3) || Claimed(a3) {
		t.Errorf("claim 3 of 127.0.0.1 (bound 2): claimed, want it left unclaimed")
	}
	if got := unclaimed.From(netip.MustParseAddr("127.0.0.1")); got != 1 {
		t.Errorf("127.0.0.1 not claimed = %d, want 1", got)
	}
	// Another address has its own bound.
	if b := accept("127.0.0.2"); !Claim(b) {
		t.Error("claim of 127.0.0.2: false, want true")
	}
	a1.Close()
	if !Claim(a3) {
		t.Error("claim of 127.0.0.1's third once its first closed: false, want true")
	}
	// Unclaimed: a2 is among the unclaimed again, and its place among
	// the claimed is free.
	if !Unclaim(a2) || Claimed(a2) {
		t.Errorf("Unclaim: Claimed %v, want false", Claimed(a2))
	}
	if got := unclaimed.From(netip.MustParseAddr("127.0.0.1")); got != 1 {
		t.Errorf("127.0.0.1 not claimed after Unclaim = %d, want 1", got)
	}
	if a4 := accept("127.0.0.1"); !Claim(a4) {
		t.Error("claim after an Unclaim: false, want true")
	}
	// 127.0.0.1 holds its 2 unclaimed: a3 cannot go back among them.
	accept("127.0.0.1")
	if Unclaim(a3) || !Claimed(a3) {
		t.Errorf("Unclaim with the address's unclaimed full: Claimed %v, want true and Unclaim false", Claimed(a3))
	}
}

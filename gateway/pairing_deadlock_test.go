package gateway

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/internal/clock"
)

// tripClock is a fake clock that, once armed, moves its time on by skip
// right after the next reading, without firing any timer: the window's
// deadline passes between two readings of the code under test, and only
// a reading (never the window's timer) can notice.
type tripClock struct {
	*clock.Fake
	mu    sync.Mutex
	armed bool
	skip  time.Duration
	ahead time.Duration
}

func (c *tripClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.Fake.Now().Add(c.ahead)
	if c.armed {
		c.armed, c.ahead = false, c.ahead+c.skip
	}
	return now
}

func (c *tripClock) arm(skip time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armed, c.skip = true, skip
}

// A vendor's certificate checked as the window's deadline passes: the
// check saw the window open, and the window closed at the next reading,
// which wrote the close to the audit (which takes the pairing service's
// lock). Reading the window with that lock held deadlocked the check, and
// then pairing for good (and the gateway's shutdown).
func TestIDevIDAtWindowDeadline(t *testing.T) {
	acmeRoot, acmeDev := vendorCA(t, "acme")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	if err := os.WriteFile(rootFile, acmeRoot, 0o644); err != nil {
		t.Fatal(err)
	}
	tc := &tripClock{Fake: clock.NewFake(time.Now())}
	g := startPairingClock(t, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} }, nil, tc, tc.Fake)
	p := g.g.pairing
	g.press(t, 1500*time.Millisecond)
	if !p.win.IsOpen() {
		t.Fatal("the press did not open the window")
	}
	tc.arm(g.g.cfg.Load().Pairing.Window.D() + time.Second)
	type result struct {
		dev string
		err error
	}
	done := make(chan result, 1)
	go func() {
		dev, err := p.verifyIDevID(acmeDev.Certificate, errors.New("not ours"))
		done <- result{dev, err}
	}()
	select {
	case r := <-done:
		// Accepted: the window was open when it was read; the session
		// can enroll in no later window.
		if r.err != nil {
			t.Errorf("certificate checked in the open window: %v, want accepted", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the certificate check did not return within 10s (deadlock: the window closed while the pairing lock was held)")
	}
	if p.win.IsOpen() {
		t.Fatal("the window is open past its deadline")
	}
	if r := g.lastClose(t); r != pairing.ReasonTimeout {
		t.Errorf("window closed for %q, want timeout", r)
	}
	// Pairing still works: the next window opens and closes.
	g.press(t, 1500*time.Millisecond)
	if !p.win.IsOpen() {
		t.Fatal("the next press did not open a window")
	}
	g.press(t, 11*time.Second)
	if p.win.IsOpen() {
		t.Fatal("a long press did not close the next window")
	}
}

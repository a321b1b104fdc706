// Package button turns the box's physical pairing button into Open and
// Cancel events. It reads a Linux input device (/dev/input/eventN, key
// code configurable, KEY_WPS_BUTTON by default) or a GPIO line through the
// GPIO character device uAPI v2, debounces the edges, and classifies each
// press by how long it was held: at least OpenAfter (1 s) opens a pairing
// window, at least CancelAfter (10 s) cancels one.
//
// Only this package can produce an Event whose Kind is Open or Cancel: the
// fields are unexported, so nothing reachable from the network can forge a
// button press. It never opens anything itself; it only reports presses.
// Held times come from the kernel's timestamps on each edge, so a slow
// reader never stretches or shortens a press.
package button

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/internal/clock"
)

// Kind says what a classified press means.
type Kind int

// The kinds of press a Watcher reports.
const (
	// Open: the button was held at least OpenAfter and less than
	// CancelAfter.
	Open Kind = iota + 1
	// Cancel: the button was held at least CancelAfter.
	Cancel
)

func (k Kind) String() string {
	switch k {
	case Open:
		return "open"
	case Cancel:
		return "cancel"
	default:
		return fmt.Sprintf("kind(%d)", int(k))
	}
}

// Event is one classified press. Its zero value has no Kind; only a
// Watcher makes events with a Kind.
type Event struct {
	kind   Kind
	held   time.Duration
	source string
	at     time.Time
}

// Kind is Open or Cancel.
func (e Event) Kind() Kind { return e.kind }

// Held is how long the button was held, from the kernel's timestamps.
func (e Event) Held() time.Duration { return e.held }

// Source names the device the press came from, e.g. "/dev/input/event3".
func (e Event) Source() string { return e.source }

// At is when the Watcher classified the press, on its clock.
func (e Event) At() time.Time { return e.at }

// Edge is one change of the button's state as a source reports it.
type Edge struct {
	// Pressed is true when the button went down, false when it came up.
	Pressed bool
	// At is the kernel's timestamp of the edge, as a duration since the
	// source's own epoch; only differences between edges matter.
	At time.Duration
	// Reset means the source lost events (SYN_DROPPED, a gap in GPIO
	// sequence numbers): the press in progress, if any, is discarded.
	Reset bool
}

// Source yields the edges of one button.
type Source interface {
	// Next blocks until the next edge, ctx is done or the source fails.
	Next(ctx context.Context) (Edge, error)
	// Name identifies the source in events and logs.
	Name() string
	Close() error
}

// Config is the classification and debouncing policy.
type Config struct {
	// OpenAfter is the shortest hold that opens a window. Default 1 s.
	OpenAfter time.Duration
	// CancelAfter is the shortest hold that cancels a window. Default 10 s.
	CancelAfter time.Duration
	// Debounce merges a release and a press closer together than this
	// into one press, and ignores presses shorter than it. Default 30 ms.
	Debounce time.Duration
}

// Defaults fills zero fields with the defaults.
func (c Config) Defaults() Config {
	if c.OpenAfter == 0 {
		c.OpenAfter = time.Second
	}
	if c.CancelAfter == 0 {
		c.CancelAfter = 10 * time.Second
	}
	if c.Debounce == 0 {
		c.Debounce = 30 * time.Millisecond
	}
	return c
}

// Validate checks a defaulted Config.
func (c Config) Validate() error {
	switch {
	case c.Debounce <= 0 || c.Debounce > 500*time.Millisecond:
		return fmt.Errorf("button debounce %v: want more than 0 and at most 500ms (default 30ms)", c.Debounce)
	case c.OpenAfter < 2*c.Debounce || c.OpenAfter > time.Minute:
		return fmt.Errorf("button open_after %v: want at least twice the debounce (%v) and at most 1m (default 1s)", c.OpenAfter, c.Debounce)
	case c.CancelAfter <= c.OpenAfter || c.CancelAfter > 5*time.Minute:
		return fmt.Errorf("button cancel_after %v: want more than open_after (%v) and at most 5m (default 10s)", c.CancelAfter, c.OpenAfter)
	}
	return nil
}

// classifier is the pure debouncing and classification state machine.
type classifier struct {
	cfg        Config
	pressed    bool
	pending    bool // released, waiting Debounce for a bounce
	start      time.Duration
	releasedAt time.Duration
}

// edge applies one edge and returns the hold that it finalised, if any.
func (c *classifier) edge(e Edge) (held time.Duration, done bool) {
	if e.Reset {
		*c = classifier{cfg: c.cfg}
		return 0, false
	}
	if e.Pressed {
		if c.pressed {
			return 0, false
		}
		if c.pending && e.At-c.releasedAt < c.cfg.Debounce {
			// Contact bounce: the press never really ended.
			c.pending, c.pressed = false, true
			return 0, false
		}
		held, done = c.flush()
		c.pressed, c.start = true, e.At
		return held, done
	}
	if !c.pressed {
		return 0, false
	}
	c.pressed, c.pending, c.releasedAt = false, true, e.At
	return 0, false
}

// flush finalises a pending release once Debounce has passed.
func (c *classifier) flush() (time.Duration, bool) {
	if !c.pending {
		return 0, false
	}
	c.pending = false
	return c.releasedAt - c.start, true
}

func (c *classifier) kind(held time.Duration) (Kind, bool) {
	switch {
	case held >= c.cfg.CancelAfter:
		return Cancel, true
	case held >= c.cfg.OpenAfter:
		return Open, true
	}
	return 0, false
}

// Watcher reads one Source and sends classified presses.
type Watcher struct {
	src   Source
	cfg   Config
	clock clock.Clock
	log   *slog.Logger
}

// NewWatcher checks cfg (after defaults) and returns a Watcher of src.
func NewWatcher(src Source, cfg Config, clk clock.Clock, log *slog.Logger) (*Watcher, error) {
	cfg = cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if src == nil || clk == nil || log == nil {
		return nil, errors.New("button watcher: source, clock and logger are required")
	}
	return &Watcher{src: src, cfg: cfg, clock: clk, log: log.With("button", src.Name())}, nil
}

type edgeResult struct {
	e   Edge
	err error
}

// Run reads edges until ctx is done or the source fails, and sends every
// Open or Cancel press to out. It returns nil when ctx ends, or the
// source's error. It does not close the source.
func (w *Watcher) Run(ctx context.Context, out chan<- Event) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	edges := make(chan edgeResult)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			e, err := w.src.Next(ctx)
			select {
			case edges <- edgeResult{e, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	c := classifier{cfg: w.cfg}
	var debounce <-chan time.Time
	for {
		var held time.Duration
		var done bool
		select {
		case <-ctx.Done():
			return nil
		case r := <-edges:
			if r.err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("button %s: %w", w.src.Name(), r.err)
			}
			if r.e.Reset {
				w.log.Warn("button events lost; press in progress discarded")
			}
			held, done = c.edge(r.e)
			debounce = nil
			if c.pending {
				debounce = w.clock.After(w.cfg.Debounce)
			}
		case <-debounce:
			debounce = nil
			held, done = c.flush()
		}
		if !done {
			continue
		}
		k, ok := c.kind(held)
		if !ok {
			w.log.Debug("button press too short", "held", held)
			continue
		}
		ev := Event{kind: k, held: held, source: w.src.Name(), at: w.clock.Now()}
		w.log.Info("button press", "kind", k.String(), "held", held)
		select {
		case out <- ev:
		case <-ctx.Done():
			return nil
		}
	}
}

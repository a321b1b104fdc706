// Package ratelog bounds what peers can make the log write: it spaces log
// lines about events a peer can repeat at the rate it can send (at most
// one line per kind of event per interval, saying how many of that kind
// were not logged since the line before), and cuts text a peer chose
// (Clip). The metrics count every event; the log says what is happening
// without a flood writing one line per packet to a router's small disk.
package ratelog

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Clip is text a peer chose (a topic or filter, a path, a claimed device
// id, an error that quotes what the peer sent), for a log line: s cut
// after max bytes, at a rune boundary (invalid UTF-8 in what is kept is
// dropped), and marked with its full length; s itself if it is no longer.
// A topic can be as long as a packet.
func Clip(s string, max int) string {
	if len(s) <= max {
		return s
	}
	return strings.ToValidUTF8(s[:max], "") + "… (" + strconv.Itoa(len(s)) + " bytes)"
}

// MaxText is how much of a text a peer chose a log line keeps (a device id
// a certificate claims, a path, an error that quotes what the peer sent):
// Clip(s, MaxText).
const MaxText = 256

// ClipErr is err's text, Clip(err.Error(), MaxText); "" for nil.
func ClipErr(err error) string {
	if err == nil {
		return ""
	}
	return Clip(err.Error(), MaxText)
}

// Every is the limiter. Kinds should come from a small set (a reason, or
// a reason and an authenticated device id), not from text a peer chose:
// once MaxKinds are held, the kinds whose interval has passed are
// forgotten, at most once per interval; those within it are not.
type Every struct {
	every  time.Duration
	mu     sync.Mutex
	kinds  map[string]tally
	pruned time.Time // when kinds were last forgotten
}

// tally is what an Every holds of one kind of event.
type tally struct {
	last  time.Time // when its last line was let through
	quiet int       // its events not logged since then
}

// MaxKinds is how many kinds an Every holds before it forgets the ones
// whose interval has passed.
const MaxKinds = 4096

// New returns a limiter letting one line per kind through per every.
func New(every time.Duration) *Every {
	return &Every{every: every, kinds: map[string]tally{}}
}

// Allow counts one event of kind at now and reports whether to log it,
// and if so how many events of the kind were not logged since its last
// line.
func (l *Every) Allow(kind string, now time.Time) (notLogged int, ok bool) {
	notLogged, _, ok = l.Note(kind, now)
	return notLogged, ok
}

// Note is Allow that also says when the kind's last event was let
// through (zero for the first), for a record that names the time ("N more
// since ..."): audit events, written on the wall clock. A clock that went
// back since the kind's last event lets the event through rather than
// holding the kind back until the clock has caught up (time.Now's
// monotonic reading never goes back).
func (l *Every) Note(kind string, now time.Time) (quiet int, since time.Time, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.kinds) >= MaxKinds && now.Sub(l.pruned) >= l.every {
		// Kinds keyed by device come and go: one whose interval has passed
		// would be let through at its next event anyway; forgotten, that
		// line says 0 not logged instead of its count (a count the
		// metrics have). At most once per interval: with more kinds than
		// MaxKinds within one interval (thousands of devices refused at
		// once), a scan at every event would cost each event the whole map
		// under the lock.
		l.pruned = now
		for k, t := range l.kinds {
			if now.Sub(t.last) >= l.every {
				delete(l.kinds, k)
			}
		}
	}
	t, seen := l.kinds[kind]
	if d := now.Sub(t.last); seen && d >= 0 && d < l.every {
		t.quiet++
		l.kinds[kind] = t
		return 0, time.Time{}, false
	}
	l.kinds[kind] = tally{last: now}
	return t.quiet, t.last, true
}

// Held is a kind's count of events not let through since its last one
// was, at Since.
type Held struct {
	Kind  string
	N     int
	Since time.Time
}

// Reset forgets every kind, so that the next event of each is let
// through, and returns the counts still held, in no particular order: for
// a caller that writes them out when something ends (a pairing window, a
// successful login after failures) rather than leave them unsaid until
// the kind's next event, which may never come.
func (l *Every) Reset() []Held {
	l.mu.Lock()
	defer l.mu.Unlock()
	var held []Held
	for k, t := range l.kinds {
		if t.quiet > 0 {
			held = append(held, Held{Kind: k, N: t.quiet, Since: t.last})
		}
	}
	clear(l.kinds)
	return held
}

// NotAudited says, for a record written when a kind's event is let
// through (an audit event), that n of its events since since were not
// recorded one by one.
func NotAudited(n int, since time.Time) string {
	return strconv.Itoa(n) + " more refused since " + since.UTC().Format(time.RFC3339) + ", not audited one by one"
}

// Line logs msg at level to log with args unless a line of the same kind
// went out less than the interval ago, and says on the line how many of
// its kind were not logged since the one before (not_logged_since_last_line,
// 0 too, so that every spaced line reads the same). For events a peer can
// repeat at the rate it can send: refusals before a device is
// authenticated, keyed by a kind from a small set (never from text the
// peer chose). The caller counts each event in its metric.
func (l *Every) Line(log *slog.Logger, level slog.Level, kind, msg string, args ...any) {
	n, ok := l.Allow(kind, time.Now())
	if !ok {
		return
	}
	log.Log(context.Background(), level, msg, append(args, "not_logged_since_last_line", n)...)
}

// DeviceLine is Line about an authenticated device, with the device first:
// for refusals of what the device sends, which a device stuck in a loop
// repeats at the rate it can send. Keyed by kind and device, so that one
// such device does not hide the lines about another.
func (l *Every) DeviceLine(log *slog.Logger, level slog.Level, kind, device, msg string, args ...any) {
	l.Line(log, level, kind+"\x00"+device, msg, append([]any{"device", device}, args...)...)
}

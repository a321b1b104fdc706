package ratelog

import (
	"bytes"
	"log/slog"
	"strconv"
	"testing"
	"time"
)

// Every lets one line per kind per interval through and reports how
// many of the kind it held back.
func TestLogEvery(t *testing.T) {
	l := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	if n, ok := l.Allow("a", t0); !ok || n != 0 {
		t.Fatalf("first event: %d, %v", n, ok)
	}
	for i := range 5 {
		if _, ok := l.Allow("a", t0.Add(time.Duration(i)*time.Second)); ok {
			t.Fatalf("event %d within the interval let through", i)
		}
	}
	if _, ok := l.Allow("b", t0); !ok {
		t.Fatal("another kind held back by the first")
	}
	if n, ok := l.Allow("a", t0.Add(10*time.Second)); !ok || n != 5 {
		t.Fatalf("after the interval: %d not logged, %v; want 5, true", n, ok)
	}
}

// An Every holding MaxKinds forgets the kinds whose interval has passed
// (a count of lines not logged with them), at most once per interval, so
// that thousands of devices refused within one interval do not make every
// event scan the map.
func TestEveryForgetsPassedKinds(t *testing.T) {
	l := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	for i := range MaxKinds {
		l.Allow("k"+strconv.Itoa(i), t0)
	}
	l.Allow("k0", t0.Add(time.Second)) // not logged: counted for k0
	later := t0.Add(11 * time.Second)
	if _, ok := l.Allow("new", later); !ok {
		t.Fatal("a new kind was not logged")
	}
	if len(l.kinds) != 1 {
		t.Fatalf("%d kinds held after the interval, want 1 (new)", len(l.kinds))
	}
	if n, ok := l.Allow("k0", later); !ok || n != 0 {
		t.Fatalf("k0 after the interval: logged %v, %d not logged before; want true, 0 (forgotten)", ok, n)
	}
}

// The kinds are scanned at most once per interval, however many events
// come: kinds past their interval stay until the interval since the last
// scan has passed.
func TestEveryScansOncePerInterval(t *testing.T) {
	l := New(10 * time.Second)
	t0 := time.Unix(1000, 0)
	for i := range MaxKinds {
		l.Allow("k"+strconv.Itoa(i), t0)
	}
	l.Allow("a", t0.Add(time.Second)) // scans: none forgotten
	l.Allow("b", t0.Add(10500*time.Millisecond))
	if len(l.kinds) != MaxKinds+2 {
		t.Fatalf("%d kinds held 9.5 s after a scan, want %d: scanned again within the interval", len(l.kinds), MaxKinds+2)
	}
	l.Allow("c", t0.Add(11500*time.Millisecond))
	if len(l.kinds) != 2 {
		t.Fatalf("%d kinds held an interval after the last scan, want 2 (b and c)", len(l.kinds))
	}
}

// Clip keeps text up to max bytes as it is, and cuts longer text at a
// rune boundary, marked with its full length.
func TestClip(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"devices/a/c/x", 96, "devices/a/c/x"},
		{"abcd", 4, "abcd"},
		{"abcdef", 4, "abcd… (6 bytes)"},
		{"ab€cd", 4, "ab… (7 bytes)"}, // € is 3 bytes: not cut in two
	} {
		if got := Clip(tc.in, tc.max); got != tc.want {
			t.Errorf("Clip(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}

// Note says when the kind's last event was let through; Reset returns
// the counts held and lets the next event of every kind through.
func TestNoteAndReset(t *testing.T) {
	l := New(time.Minute)
	t0 := time.Unix(1000, 0)
	if n, since, ok := l.Note("a", t0); !ok || n != 0 || !since.IsZero() {
		t.Fatalf("first: %d, %v, %v", n, since, ok)
	}
	l.Note("a", t0.Add(time.Second))
	l.Note("a", t0.Add(2*time.Second))
	if n, since, ok := l.Note("a", t0.Add(time.Minute)); !ok || n != 2 || !since.Equal(t0) {
		t.Fatalf("after the interval: %d since %v, %v; want 2 since %v, true", n, since, ok, t0)
	}
	l.Note("a", t0.Add(61*time.Second))
	l.Note("b", t0)
	held := l.Reset()
	if len(held) != 1 || held[0] != (Held{Kind: "a", N: 1, Since: t0.Add(time.Minute)}) {
		t.Fatalf("Reset = %+v, want a: 1 since t0+1m", held)
	}
	if _, _, ok := l.Note("a", t0.Add(62*time.Second)); !ok {
		t.Fatal("held back after Reset")
	}
}

// A clock that went back (the wall clock set) lets the kind's next event
// through instead of holding the kind back until it has caught up.
func TestNoteClockBack(t *testing.T) {
	l := New(time.Minute)
	t0 := time.Unix(1_000_000, 0)
	l.Note("a", t0)
	l.Note("a", t0.Add(time.Second))
	if n, _, ok := l.Note("a", t0.Add(-time.Hour)); !ok || n != 1 {
		t.Fatalf("clock an hour back: %d, %v; want 1, true", n, ok)
	}
}

// Line writes the first line of a kind with its count (0), holds back the
// rest within the interval, and keys DeviceLine by device too, device first.
func TestLineAndDeviceLine(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}}))
	l := New(time.Hour)
	for range 3 {
		l.Line(log, slog.LevelWarn, "k", "refused", "remote", "192.0.2.1")
		l.DeviceLine(log, slog.LevelInfo, "k", "dev-a", "bad path", "path", "/x")
		l.DeviceLine(log, slog.LevelInfo, "k", "dev-b", "bad path", "path", "/y")
	}
	want := `level=WARN msg=refused remote=192.0.2.1 not_logged_since_last_line=0
level=INFO msg="bad path" device=dev-a path=/x not_logged_since_last_line=0
level=INFO msg="bad path" device=dev-b path=/y not_logged_since_last_line=0
`
	if got := buf.String(); got != want {
		t.Fatalf("lines:\n%s\nwant:\n%s", got, want)
	}
}

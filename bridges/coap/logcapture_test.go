package coap

import (
	"context"
	"log/slog"
	"strings"
	"sync"
)

// LogLines is a slog.Handler that keeps the messages of the lines written
// through it, for tests that count log lines.
type LogLines struct {
	mu    sync.Mutex
	lines []string
	attrs []map[string]string
}

func (l *LogLines) Enabled(context.Context, slog.Level) bool { return true }

func (l *LogLines) Handle(_ context.Context, r slog.Record) error {
	l.record(nil, r)
	return nil
}

// record keeps r with the attributes of the logger it came through (pre,
// from With) and its own.
func (l *LogLines) record(pre []slog.Attr, r slog.Record) {
	a := map[string]string{}
	for _, at := range pre {
		a[at.Key] = at.Value.String()
	}
	r.Attrs(func(at slog.Attr) bool { a[at.Key] = at.Value.String(); return true })
	l.mu.Lock()
	l.lines = append(l.lines, r.Message)
	l.attrs = append(l.attrs, a)
	l.mu.Unlock()
}

func (l *LogLines) WithAttrs(as []slog.Attr) slog.Handler { return &logWith{l, as} }
func (l *LogLines) WithGroup(string) slog.Handler         { return l }

// logWith is a LogLines seen through a logger's With: its lines carry
// those attributes too (a device's logger has "device" so).
type logWith struct {
	l   *LogLines
	pre []slog.Attr
}

func (w *logWith) Enabled(context.Context, slog.Level) bool { return true }
func (w *logWith) Handle(_ context.Context, r slog.Record) error {
	w.l.record(w.pre, r)
	return nil
}
func (w *logWith) WithAttrs(as []slog.Attr) slog.Handler {
	return &logWith{w.l, append(append([]slog.Attr(nil), w.pre...), as...)}
}
func (w *logWith) WithGroup(string) slog.Handler { return w }

// Count is how many lines so far start with prefix.
func (l *LogLines) Count(prefix string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.lines {
		if strings.HasPrefix(m, prefix) {
			n++
		}
	}
	return n
}

// Attrs are the attributes of the lines so far that start with prefix.
func (l *LogLines) Attrs(prefix string) []map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]string
	for i, m := range l.lines {
		if strings.HasPrefix(m, prefix) {
			out = append(out, l.attrs[i])
		}
	}
	return out
}

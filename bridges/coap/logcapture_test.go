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
	a := map[string]string{}
	r.Attrs(func(at slog.Attr) bool { a[at.Key] = at.Value.String(); return true })
	l.mu.Lock()
	l.lines = append(l.lines, r.Message)
	l.attrs = append(l.attrs, a)
	l.mu.Unlock()
	return nil
}

func (l *LogLines) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *LogLines) WithGroup(string) slog.Handler      { return l }

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

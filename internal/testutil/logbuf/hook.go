package logbuf

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
)

// Hook is a slog.Handler that hands every record to Next and, once armed
// (Arm), runs a function just before the first record whose message
// starts with Prefix is handed on: for tests that make something happen
// at the moment a server reaches a given line, on the server's goroutine.
// Loggers derived from it (With, WithGroup) share its arming.
type Hook struct {
	Next   slog.Handler
	Prefix string
	fn     *atomic.Pointer[func()]
}

// NewHook returns a Hook on next for lines starting with prefix.
func NewHook(next slog.Handler, prefix string) *Hook {
	return &Hook{Next: next, Prefix: prefix, fn: new(atomic.Pointer[func()])}
}

// Arm has fn run once, at the next line starting with Prefix.
func (h *Hook) Arm(fn func()) { h.fn.Store(&fn) }

func (h *Hook) Enabled(ctx context.Context, l slog.Level) bool { return h.Next.Enabled(ctx, l) }

func (h *Hook) Handle(ctx context.Context, r slog.Record) error {
	if strings.HasPrefix(r.Message, h.Prefix) {
		if fn := h.fn.Swap(nil); fn != nil {
			(*fn)()
		}
	}
	return h.Next.Handle(ctx, r)
}

func (h *Hook) WithAttrs(a []slog.Attr) slog.Handler {
	return &Hook{Next: h.Next.WithAttrs(a), Prefix: h.Prefix, fn: h.fn}
}

func (h *Hook) WithGroup(name string) slog.Handler {
	return &Hook{Next: h.Next.WithGroup(name), Prefix: h.Prefix, fn: h.fn}
}

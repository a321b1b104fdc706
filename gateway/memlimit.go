package gateway

import (
	"log/slog"
	"math"
	"runtime/debug"
)

// applyMemoryLimit sets the Go runtime's soft memory limit to limit bytes
// (-1: none) unless env, the GOMEMLIMIT environment variable, is set: an
// operator's explicit choice wins. Without a limit the heap may grow to
// twice what is live before a collection, which on a 256 MiB box with
// thousands of idle sessions is the difference between fitting and the OOM
// killer. It returns a func that puts the previous limit back.
func applyMemoryLimit(limit int64, env string, log *slog.Logger) (restore func()) {
	if env != "" {
		log.Info("memory limit from GOMEMLIMIT; memory_limit ignored", "GOMEMLIMIT", env, "memory_limit", limit)
		return func() {}
	}
	if limit < 0 {
		limit = math.MaxInt64 // the runtime's "no limit"
	}
	prev := debug.SetMemoryLimit(limit)
	log.Debug("memory limit set", "bytes", limit)
	return func() { debug.SetMemoryLimit(prev) }
}

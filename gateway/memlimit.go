package gateway

import (
	"log/slog"
	"math"
	"runtime/debug"
)

// gcPercentUnderLimit is the collector's GOGC while a memory limit caps the
// heap. The default of 100 collects whenever the heap has doubled, and with
// the few MiB a gateway keeps live that is every 4 MiB of allocation: about
// once per hundred DTLS handshakes, a sixth of a handshake's CPU. With a
// limit in force the heap cannot grow past it whatever GOGC says, so a
// larger GOGC only spends memory the limit already allows (10,000 idle
// devices: 220 -> 223 MiB; see docs/performance.md).
const gcPercentUnderLimit = 400

// applyMemoryLimit sets the Go runtime's soft memory limit to limit bytes
// (-1: none) unless envLimit, the GOMEMLIMIT environment variable, is set:
// an operator's explicit choice wins. Without a limit the heap may grow to
// twice what is live before a collection, which on a 256 MiB box with
// thousands of idle sessions is the difference between fitting and the OOM
// killer. While a limit is in force and envGOGC (GOGC) is unset, the
// collector's percentage is raised to gcPercentUnderLimit. It returns a
// func that puts the previous limit and percentage back.
func applyMemoryLimit(limit int64, envLimit, envGOGC string, log *slog.Logger) (restore func()) {
	var restoreLimit func()
	if envLimit != "" {
		log.Info("memory limit from GOMEMLIMIT; memory_limit ignored", "GOMEMLIMIT", envLimit, "memory_limit", limit)
		restoreLimit = func() {}
	} else {
		if limit < 0 {
			limit = math.MaxInt64 // the runtime's "no limit"
		}
		prev := debug.SetMemoryLimit(limit)
		log.Debug("memory limit set", "bytes", limit)
		restoreLimit = func() { debug.SetMemoryLimit(prev) }
	}
	if envGOGC != "" || debug.SetMemoryLimit(-1) == math.MaxInt64 {
		return restoreLimit
	}
	prevPercent := debug.SetGCPercent(gcPercentUnderLimit)
	log.Debug("garbage collector percentage raised under the memory limit", "gogc", gcPercentUnderLimit)
	return func() {
		debug.SetGCPercent(prevPercent)
		restoreLimit()
	}
}

// Package buildinfo reports what binary this is and the earliest time the
// wall clock can plausibly show, so that a box booting in 1970 does not judge
// certificates against a wrong clock.
package buildinfo

import (
	"runtime/debug"
	"time"
)

// Version is set at link time (-ldflags "-X .../buildinfo.Version=v1.2.3").
var Version = "dev"

// floor is the release date of this source tree; a clock earlier than this
// is certainly wrong. Link-time override: -X .../buildinfo.floor=2027-01-01.
var floor = "2026-11-01"

// NotBefore is the earliest plausible wall-clock time: the later of the
// source floor and the VCS commit time stamped into the binary.
func NotBefore() time.Time {
	t, err := time.Parse("2006-01-02", floor)
	if err != nil {
		t = time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.time" {
				if vt, err := time.Parse(time.RFC3339, s.Value); err == nil && vt.After(t) {
					t = vt
				}
			}
		}
	}
	return t
}

package pki

import (
	"errors"
	"fmt"
	"time"
)

// ErrClockNotSet is returned by every operation that judges or issues a
// certificate while the wall clock is implausible (a board without an RTC
// that booted in 1970 and has no time from NTP yet).
var ErrClockNotSet = errors.New("system clock is not set (earlier than this build): certificates are neither accepted nor issued until the time is synchronised (NTP)")

// Clock tells the time and whether it can be trusted.
type Clock interface {
	Now() time.Time
	// Sane returns ErrClockNotSet (wrapped) while the clock is implausible.
	Sane() error
}

// SystemClock is the real clock, judged plausible once it is not before
// NotBefore (the build time, see internal/buildinfo).
type SystemClock struct{ NotBefore time.Time }

// Now returns time.Now().
func (c SystemClock) Now() time.Time { return time.Now() }

// Sane reports whether the clock is after NotBefore.
func (c SystemClock) Sane() error {
	if now := time.Now(); now.Before(c.NotBefore) {
		return fmt.Errorf("clock reads %s, before %s: %w", now.UTC().Format(time.RFC3339), c.NotBefore.UTC().Format(time.DateOnly), ErrClockNotSet)
	}
	return nil
}

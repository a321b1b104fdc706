package console

import (
	"time"

	lockout "github.com/bastion-iot/bastion/internal/throttle"
)

// ThrottlePolicy sets login rate limiting. From the Free-th failure on, each
// failure locks the key for Base·2^(n-Free), at most Max. Keys are the user
// name and the source address, counted separately, so one source cannot
// try many users and many sources cannot try one user.
type ThrottlePolicy struct {
	FreeUser, FreeSource int
	Base, Max            time.Duration
	// Forget: a key with no failure for this long starts over.
	Forget time.Duration
}

// DefaultThrottle: 5 free failures per user, 20 per source, then 30 s
// doubling to 1 h.
var DefaultThrottle = ThrottlePolicy{FreeUser: 5, FreeSource: 20, Base: 30 * time.Second, Max: time.Hour, Forget: 24 * time.Hour}

// throttle is the console's: keys "u:"+user, "s:"+source and the setup
// and recovery pages' own.
type throttle struct {
	*lockout.Throttle
	p ThrottlePolicy
}

func newThrottle(p ThrottlePolicy) *throttle {
	return &throttle{Throttle: lockout.New(lockout.Policy{Base: p.Base, Max: p.Max, Forget: p.Forget}, 10000), p: p}
}

func (t *throttle) failLogin(now time.Time, user, source string) {
	t.Fail(now, "u:"+user, t.p.FreeUser)
	t.Fail(now, "s:"+source, t.p.FreeSource)
}

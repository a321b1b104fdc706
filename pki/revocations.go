package pki

import (
	"container/heap"
	"sync"
	"time"
)

// Revocations is the set of revoked devices and certificate serials. It is
// consulted on every handshake, so a revocation takes effect for the next
// handshake at once; transports also subscribe to close open sessions of a
// revoked device, and look the serials of their certificate sessions up
// every few seconds (CA.CertValid), which ends the sessions of a revoked
// or retired serial.
type Revocations struct {
	clock   Clock
	mu      sync.RWMutex
	devices map[string]bool
	serials map[string]bool
	// retire holds renewed certificates' serials, the time from which
	// they are refused and, when known, their NotAfter (RetireCert).
	retire map[string]retirement
	// ends holds the retirements whose NotAfter is known, earliest end
	// first: a device renewing every hour would otherwise add 8,760
	// entries a year, kept until restart.
	ends retireEnds
	subs []func(device string)
}

type retirement struct{ at, notAfter time.Time }

// retirePruneMax is how many expired retirements one retirement drops at
// most: more than the one it adds, so that the expired ones do not pile
// up, and bounded, as every handshake waits for the lock meanwhile.
const retirePruneMax = 16

// NewRevocations returns an empty set that judges by clock when a retired
// certificate has expired.
func NewRevocations(clock Clock) *Revocations {
	return &Revocations{clock: clock, devices: map[string]bool{}, serials: map[string]bool{}, retire: map[string]retirement{}}
}

// Revoked reports whether the device or the serial is revoked.
func (r *Revocations) Revoked(device, serial string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.devices[device] || (serial != "" && r.serials[serial])
}

// RevokeSerial adds one certificate serial. It tells no subscriber: open
// sessions on the certificate end at the transports' next check of their
// sessions' certificates (CA.CertValid), within seconds.
func (r *Revocations) RevokeSerial(serial string) {
	r.mu.Lock()
	r.serials[serial] = true
	r.mu.Unlock()
}

// RetireCert refuses a renewed certificate's serial from at on; an
// earlier time already set is kept. The entry is dropped once the clock is
// past notAfter, the certificate's end, from which the chain check
// (VerifyDevice, CertValid) refuses it as expired anyway. A clock that
// runs ahead drops it early, as it has the store delete its record early.
func (r *Revocations) RetireCert(serial string, at, notAfter time.Time) {
	r.retireSerial(serial, at, notAfter)
}

// RetireSerial is RetireCert for a certificate whose NotAfter is not known
// here: it moves the time of a retirement RetireCert made earlier, which
// keeps its end; a new entry is kept until restart.
func (r *Revocations) RetireSerial(serial string, at time.Time) {
	r.retireSerial(serial, at, time.Time{})
}

func (r *Revocations) retireSerial(serial string, at, notAfter time.Time) {
	// An unset clock reads before every certificate's end: it drops
	// nothing, as it must not judge expiry.
	now, sane := r.clock.Now(), r.clock.Sane() == nil
	r.mu.Lock()
	defer r.mu.Unlock()
	old, ok := r.retire[serial]
	if ok && !at.Before(old.at) {
		at = old.at
	}
	if !ok || old.notAfter.IsZero() {
		old.notAfter = notAfter
		if !notAfter.IsZero() {
			heap.Push(&r.ends, retireEnd{serial: serial, notAfter: notAfter})
		}
	}
	r.retire[serial] = retirement{at: at, notAfter: old.notAfter}
	for i := 0; sane && i < retirePruneMax && len(r.ends) > 0 && now.After(r.ends[0].notAfter); i++ {
		delete(r.retire, heap.Pop(&r.ends).(retireEnd).serial)
	}
}

// RetireAt returns the time from which serial is refused, if it is a
// renewed certificate's.
func (r *Revocations) RetireAt(serial string) (time.Time, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	e, ok := r.retire[serial]
	return e.at, ok
}

// Retired reports whether serial is a renewed certificate's refused at now.
func (r *Revocations) Retired(serial string, now time.Time) bool {
	at, ok := r.RetireAt(serial)
	return ok && !now.Before(at)
}

// RevokeDevice revokes a device and tells every subscriber, so that open
// sessions of that device are closed.
func (r *Revocations) RevokeDevice(device string) {
	r.mu.Lock()
	r.devices[device] = true
	subs := append([]func(string){}, r.subs...)
	r.mu.Unlock()
	for _, f := range subs {
		f(device)
	}
}

// Subscribe registers f to be called (synchronously) for every newly
// revoked device. f must not block.
func (r *Revocations) Subscribe(f func(device string)) {
	r.mu.Lock()
	r.subs = append(r.subs, f)
	r.mu.Unlock()
}

// retireEnds is a heap of retired serials by their certificate's NotAfter.
type retireEnds []retireEnd

type retireEnd struct {
	serial   string
	notAfter time.Time
}

func (h retireEnds) Len() int           { return len(h) }
func (h retireEnds) Less(i, j int) bool { return h[i].notAfter.Before(h[j].notAfter) }
func (h retireEnds) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *retireEnds) Push(x any)        { *h = append(*h, x.(retireEnd)) }
func (h *retireEnds) Pop() any {
	old := *h
	e := old[len(old)-1]
	old[len(old)-1] = retireEnd{}
	*h = old[:len(old)-1]
	return e
}

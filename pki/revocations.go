package pki

import (
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
	mu      sync.RWMutex
	devices map[string]bool
	serials map[string]bool
	// retire holds renewed certificates' serials and the time from which
	// they are refused (RetireSerial).
	retire map[string]time.Time
	subs   []func(device string)
}

// NewRevocations returns an empty set.
func NewRevocations() *Revocations {
	return &Revocations{devices: map[string]bool{}, serials: map[string]bool{}, retire: map[string]time.Time{}}
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

// RetireSerial refuses a renewed certificate's serial from at on; an
// earlier time already set is kept.
func (r *Revocations) RetireSerial(serial string, at time.Time) {
	r.mu.Lock()
	if old, ok := r.retire[serial]; !ok || at.Before(old) {
		r.retire[serial] = at
	}
	r.mu.Unlock()
}

// RetireAt returns the time from which serial is refused, if it is a
// renewed certificate's.
func (r *Revocations) RetireAt(serial string) (time.Time, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	at, ok := r.retire[serial]
	return at, ok
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

package pki

import "sync"

// Revocations is the set of revoked devices and certificate serials. It is
// consulted on every handshake, so a revocation takes effect for the next
// handshake at once; transports also subscribe to close open sessions.
type Revocations struct {
	mu      sync.RWMutex
	devices map[string]bool
	serials map[string]bool
	subs    []func(device string)
}

// NewRevocations returns an empty set.
func NewRevocations() *Revocations {
	return &Revocations{devices: map[string]bool{}, serials: map[string]bool{}}
}

// Revoked reports whether the device or the serial is revoked.
func (r *Revocations) Revoked(device, serial string) bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.devices[device] || (serial != "" && r.serials[serial])
}

// RevokeSerial adds one certificate serial.
func (r *Revocations) RevokeSerial(serial string) {
	r.mu.Lock()
	r.serials[serial] = true
	r.mu.Unlock()
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

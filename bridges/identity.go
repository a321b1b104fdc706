package bridges

import (
	"errors"
	"time"
)

// Identity is what the transports need from the gateway to know who a
// device is. The gateway implements it with its CA and store; the
// transports never look at certificates or keys any other way.
type Identity interface {
	// VerifyCert checks the certificate chain a device presented in a
	// TLS/DTLS handshake and returns its device id.
	VerifyCert(rawCerts [][]byte) (device string, err error)
	// PSK returns the device and key for a DTLS PSK identity; an unknown or
	// revoked identity is an error.
	PSK(identity []byte) (device string, key []byte, err error)
	// CheckSecret verifies an MQTT username (device id) and secret for
	// devices that cannot do client certificates. An error that is
	// ErrBusy says the check was not made (too many at once), not that the
	// secret is wrong.
	CheckSecret(device string, secret []byte) error
	// OnRevoke registers f to be called when a device is revoked, so that
	// its open sessions are closed. f must not block.
	OnRevoke(f func(device string))
	// CertValid reports whether a certificate VerifyCert accepted for
	// device when a session was established (its serial as pki.Serial
	// gives it, and its NotAfter) is still good now, by the gateway's
	// clock: nil, or an error wrapping pki.ErrRevoked (device or serial
	// revoked), pki.ErrCertRetired (replaced by a renewal) or
	// pki.ErrCertExpired. The transports ask it for each open certificate
	// session every few seconds and end the sessions it refuses, so it
	// must be cheap: no chain verification, only the clock and lookups in
	// memory.
	CertValid(device, serial string, notAfter time.Time) error
}

// ErrBusy is (wrapped in) an Identity's error for a check it did not make
// because too many were running: the device should try again shortly.
var ErrBusy = errors.New("busy")

// ErrPairingRefused is (wrapped in) an Identity's error for an enrollment
// identity or manufacturer certificate the pairing service does not admit
// now (no pairing window open, no setup-code exchange completed, no usable
// device id): not a wrong credential, and not a revocation.
var ErrPairingRefused = errors.New("pairing refused")

// ErrLookup is (wrapped in) an Identity's error for credentials that could
// not be checked (the store failed to answer): the device is not at fault.
var ErrLookup = errors.New("credentials could not be looked up")

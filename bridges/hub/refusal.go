package hub

import (
	"crypto/x509"
	"errors"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/pki"
)

// CertRefusal names why a device certificate was refused, for the reason
// label: each of pki's sentinel errors under the reason of its name, then
// what crypto/x509 found wrong with the chain. A certificate retired by a
// renewal is refused as a revoked one is (its error wraps both): it is
// counted as retired, as the session it had open is when the sweep ends it
// (CertEnd). MQTT has no check of its own before this one, so a sentinel
// missing here was counted bad_certificate there (an expired certificate,
// a gateway clock not set), which sent whoever read the metric to look at
// the certificate's encoding. The gateway's own refusals of a
// certificate it could not judge (a pairing session outside a window, a
// store that failed to answer) have their reasons too.
func CertRefusal(err error) string {
	var inv x509.CertificateInvalidError
	var ua x509.UnknownAuthorityError
	switch {
	case errors.Is(err, pki.ErrCertRetired):
		return ReasonCertRetired
	case errors.Is(err, pki.ErrRevoked):
		return ReasonRevoked
	case errors.Is(err, pki.ErrCertExpired):
		return ReasonExpired
	case errors.Is(err, pki.ErrClockNotSet):
		return ReasonClockNotSet
	case errors.Is(err, bridges.ErrPairingRefused):
		return ReasonPairingRefused
	case errors.Is(err, bridges.ErrLookup):
		return ReasonIdentityError
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		return ReasonExpired
	case errors.As(err, &ua):
		return ReasonWrongCA
	default:
		return ReasonBadCert
	}
}

// ClaimedDevice is the device id a certificate names, unverified: only for
// log lines about refused certificates, so that a person can see which
// device failed.
func ClaimedDevice(raw [][]byte) string {
	if len(raw) == 0 {
		return ""
	}
	c, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return ""
	}
	id, err := pki.DeviceIDOf(c)
	if err != nil {
		return c.Subject.CommonName
	}
	return id
}

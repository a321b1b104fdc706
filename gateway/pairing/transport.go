package pairing

import (
	"crypto/sha256"
	"strings"
)

// The DTLS-PSK identities of the two enrollment sessions of a setup-code
// device. The gateway recognises them (and only while a window is open);
// no operational PSK identity starts with "bastion-".
const (
	// PAKEIdentityPrefix starts the identity of the session that carries
	// the SPAKE2+ messages. Its key is public (PublicPAKEPSK): the PAKE is
	// secure over an open channel, and DTLS only keeps the exchange off
	// cleartext and away from the operational resources.
	PAKEIdentityPrefix = "bastion-pake:"
)

// PublicPAKEPSK is the (public) DTLS key of a PAKE session for deviceID.
// Knowing it gives nothing: it protects no secret, and the session may
// only run the exchange.
func PublicPAKEPSK(deviceID string) []byte {
	h := sha256.Sum256([]byte("bastion public pake psk v1\x00" + deviceID))
	return h[:]
}

// SplitIdentity returns the device ID of a PAKE or enrollment PSK
// identity, and which prefix it had ("" if neither).
func SplitIdentity(identity string) (prefix, deviceID string) {
	for _, p := range []string{PAKEIdentityPrefix, PSKIdentityPrefix} {
		if id, ok := strings.CutPrefix(identity, p); ok {
			return p, id
		}
	}
	return "", ""
}

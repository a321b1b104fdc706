// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

// SetOnCookieVerified sets f to run on a server connection once the client
// has echoed a valid HelloVerifyRequest cookie (RFC 6347 4.2.1), i.e. has
// shown that it receives datagrams at its source address, and before any
// cryptographic work on its ClientHello. If f returns an error the
// handshake ends with that error (no alert is sent). f runs on the
// goroutine running the handshake, at most once. It is never called when
// the handshake needs no cookie (Config.InsecureSkipVerifyHello, session
// resumption as client) or ends before the cookie comes back. Call it
// before the handshake starts (Bastion patch (50): a limit of handshakes
// per source address counts only peers that own the address, so spoofed
// ClientHellos cannot use up a device's share).
func (c *Conn) SetOnCookieVerified(f func() error) {
	c.handshakeMutex.Lock()
	defer c.handshakeMutex.Unlock()
	c.handshakeConfig.onCookieVerified = f
}

// cookieVerified runs the onCookieVerified hook, at most once: where a
// server's handshake has checked the client's cookie (flight2Parse, or
// flight0ParseVerified with patch (51)).
func (c *handshakeConfig) cookieVerified() error {
	hook := c.onCookieVerified
	if hook == nil {
		return nil
	}
	c.onCookieVerified = nil

	return hook()
}

// Package refusal is for tests of servers that must refuse a peer: it
// checks that the server ends a connection rather than keeping it open.
// It is never used by production code.
package refusal

import (
	"errors"
	"net"
	"time"
)

// Ended opens a TCP connection to addr, does what hello does on it (a TLS
// handshake with a certificate the server must refuse, plaintext, ...) and
// reads until the server ends the connection. It returns an error if the
// connection cannot be opened or the server keeps it open for 10 s; a
// hello that fails (refused within the client's own handshake) is an end.
func Ended(addr string, hello func(c net.Conn) (net.Conn, error)) error {
	return EndedFrom(nil, addr, hello)
}

// EndedFrom is Ended on a connection from the local address from (nil:
// the system picks one), for a server that bounds what one source address
// may hold.
func EndedFrom(from net.Addr, addr string, hello func(c net.Conn) (net.Conn, error)) error {
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: from}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := hello(raw)
	if err != nil {
		return nil
	}
	// What it reads (a TLS alert, an HTTP 400) does not matter; that it
	// ends does.
	var b [256]byte
	for {
		_, err := c.Read(b[:])
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return errors.New("the server kept open a connection it should refuse")
		}
		if err != nil {
			return nil
		}
	}
}

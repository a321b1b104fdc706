//go:build !linux

package mqtt

import "net"

// newRawConn returns c: the raw-syscall connection is Linux only
// (rawconn_linux.go).
func newRawConn(c net.Conn) net.Conn { return c }

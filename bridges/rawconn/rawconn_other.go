//go:build !linux

// Package rawconn wraps a TCP connection so that its reads and writes enter
// the kernel without the Go runtime's syscall entry (Linux only: here the
// connection is returned as it is).
package rawconn

import "net"

// Wrap returns c: the raw-syscall connection is Linux only
// (rawconn_linux.go).
func Wrap(c net.Conn) net.Conn { return c }

// Is reports false: nothing is wrapped on this system.
func Is(net.Conn) bool { return false }

// Package rawconn wraps a TCP connection so that its reads and writes enter
// the kernel without the Go runtime's syscall entry (Linux; elsewhere the
// connection is returned as it is). The device sessions of bridges/mqtt and
// the upstream link of bridges/upstream run on it. It never changes what is
// read or written, the deadlines, or the errors.
package rawconn

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// rawConn is a device's TCP connection whose read(2) and write(2) enter the
// kernel with syscall.RawSyscall instead of the runtime's syscall entry.
//
// Why: the socket is non-blocking (the runtime's poller waits for it, as
// for any net.Conn: RawConn.Read and Write park the goroutine on EAGAIN and
// honour the connection's deadlines), so these calls return at once, and
// the runtime's entry only costs. It marks the P as in a syscall and, when
// every P was idle before (a device sending one message at a time), wakes
// the runtime's sysmon thread with a futex; sysmon then polls every 20 µs
// until the process is idle again and goes back to sleep. In CPU profiles
// of bastiond under the MQTT benchmark that was 8-15 % of the gateway's CPU
// (a wake-up and several nanosleeps per message with one publisher; a
// 20 µs poll throughout with 50). Any system call through the runtime's
// entry wakes a sleeping sysmon, so the upstream link's socket runs on it
// too (bridges/upstream). The same trick is used by Go network
// libraries built on epoll (gnet, cloudwego/netpoll) and proposed for the
// standard library itself (golang/go#19563); golang/go#18236 is sysmon's
// fixed tick.
//
// What does not change: a read or write that would block waits in the
// poller exactly as net.TCPConn's does, deadlines and Close work through the
// same descriptor (RawConn holds a reference so the descriptor is not
// closed under a call), errors are *net.OpError as net.Conn's, and io.EOF is
// returned at end of stream.
type rawConn struct {
	*net.TCPConn
	rc syscall.RawConn

	// The callbacks RawConn runs are made once, with their arguments and
	// results here, so that a call allocates nothing (a closure per call
	// escaped to the heap: five allocations per message). The mutexes keep
	// net.Conn's promise that Read and Write may be called concurrently.
	rmu    sync.Mutex
	rbuf   []byte
	rn     int
	rerrno syscall.Errno
	readFn func(fd uintptr) bool

	wmu     sync.Mutex
	wbuf    []byte
	wn      int
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

// Wrap wraps c, or returns it as it is if it is not a TCP connection.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	r := &rawConn{TCPConn: tc, rc: rc}
	r.readFn, r.writeFn = r.read, r.write
	return r
}

func (c *rawConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// read is RawConn.Read's callback: false asks the poller to wait until the
// socket is readable and call it again.
func (c *rawConn) read(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		if e == syscall.EINTR {
			continue
		}
		c.rn, c.rerrno = int(r), e
		return e != syscall.EAGAIN
	}
}

func (c *rawConn) write(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&c.wbuf[0])), uintptr(len(c.wbuf)))
		if e == syscall.EINTR {
			continue
		}
		c.wn, c.werrno = int(r), e
		return e != syscall.EAGAIN
	}
}

func (c *rawConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerrno = p, 0, 0
	err := c.rc.Read(c.readFn)
	n, errno := c.rn, c.rerrno
	c.rbuf = nil
	switch {
	case err != nil: // closed, or the deadline passed
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

func (c *rawConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	defer func() { c.wbuf = nil }()
	written := 0
	for written < len(p) {
		c.wbuf, c.wn, c.werrno = p[written:], 0, 0
		err := c.rc.Write(c.writeFn)
		switch {
		case err != nil:
			return written, c.opError("write", err)
		case c.werrno != 0:
			return written, c.opError("write", os.NewSyscallError("write", c.werrno))
		case c.wn <= 0:
			return written, c.opError("write", io.ErrShortWrite)
		}
		written += c.wn
	}
	return written, nil
}

// Is reports whether c is a connection Wrap made (tests check that the
// listeners and the upstream link use it).
func Is(c net.Conn) bool {
	_, ok := c.(*rawConn)
	return ok
}

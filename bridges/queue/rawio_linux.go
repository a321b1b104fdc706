//go:build linux

package queue

import (
	"io"
	"os"
	"syscall"
	"unsafe"
)

// rawOffsets is whether pread/pwrite can be made raw here: their 64-bit
// offset is one register only on 64-bit systems (the 32-bit ABIs split
// and align it, which the syscall package does per architecture); on
// armv7 and mipsle the queue keeps (*os.File).ReadAt and WriteAt. The
// fsync has no offset and is raw everywhere on Linux.
const rawOffsets = unsafe.Sizeof(uintptr(0)) == 8

// rawFsync is fsync(2) on f entered with syscall.RawSyscall (see
// useRawSync). Durability is the same: it is the same system call on the
// same descriptor, and EINTR is retried as os.File.Sync does.
func rawFsync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: err}
	}
	var errno syscall.Errno
	if cerr := rc.Control(func(fd uintptr) {
		for {
			_, _, errno = syscall.RawSyscall(syscall.SYS_FSYNC, fd, 0, 0)
			if errno != syscall.EINTR {
				return
			}
		}
	}); cerr != nil {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: cerr}
	}
	if errno != 0 {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: errno}
	}
	return nil
}

// rawPwrite is (*os.File).WriteAt made with syscall.RawSyscall6 (see
// useRawSync): it writes all of b at off or returns the error (a short
// write is retried, as WriteAt does; ENOSPC comes back as the Errno).
func rawPwrite(f *os.File, b []byte, off int64) (int, error) {
	n, stalled, err := rawAt(f, "write", syscall.SYS_PWRITE64, b, off)
	if err == nil && stalled {
		// WriteAt's io.ErrShortWrite; pwrite makes no progress.
		err = &os.PathError{Op: "write", Path: f.Name(), Err: syscall.EIO}
	}
	return n, err
}

// rawPread is (*os.File).ReadAt made with syscall.RawSyscall6 (see
// useRawSync): it reads len(b) bytes at off, or returns io.EOF after the
// bytes there are.
func rawPread(f *os.File, b []byte, off int64) (int, error) {
	n, stalled, err := rawAt(f, "read", syscall.SYS_PREAD64, b, off)
	if err == nil && stalled {
		err = io.EOF
	}
	return n, err
}

// rawAt is the loop of rawPwrite and rawPread: trap (pwrite64 or
// pread64) on all of b at off, retrying EINTR and short transfers. stalled
// reports a call that moved no bytes before b was done.
func rawAt(f *os.File, op string, trap uintptr, b []byte, off int64) (n int, stalled bool, err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, false, &os.PathError{Op: op, Path: f.Name(), Err: err}
	}
	var errno syscall.Errno
	if cerr := rc.Control(func(fd uintptr) {
		for n < len(b) {
			r, _, e := syscall.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(&b[n])), uintptr(len(b)-n), uintptr(off+int64(n)), 0, 0)
			switch {
			case e == syscall.EINTR:
				continue
			case e != 0:
				errno = e
				return
			case r == 0:
				stalled = true
				return
			}
			n += int(r)
		}
	}); cerr != nil {
		return n, false, &os.PathError{Op: op, Path: f.Name(), Err: cerr}
	}
	if errno != 0 {
		return n, false, &os.PathError{Op: op, Path: f.Name(), Err: errno}
	}
	return n, stalled, nil
}

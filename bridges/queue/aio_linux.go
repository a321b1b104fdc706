//go:build linux

package queue

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// aioFsync makes a commit's fsync without any thread waiting in the
// kernel for it: the fsync is submitted with Linux native AIO
// (IOCB_CMD_FSYNC, Linux 4.18), the kernel runs it on one of its own
// worker threads, and its completion is signalled on an eventfd that the
// writer goroutine waits on through the runtime's network poller, like a
// socket. It is the same fsync of the same file (vfs_fsync in the kernel),
// so durability is the same as fsync(2).
//
// Why: a blocking fsync either holds the writer's P and thread for its
// whole duration (rawFsync: nothing else runs on that P, a garbage
// collection's stop-the-world waits for the disk, impossible with one P)
// or goes through the runtime's syscall entry, where the sysmon thread takes
// the P away in almost every commit and keeps polling every 20 µs
// (useRawSync). Parked on the poller the writer holds neither, with any
// number of Ps and any disk speed.
//
// Only the writer goroutine uses it (one fsync in flight at a time).
type aioFsync struct {
	ctx uintptr  // aio_context_t
	efd *os.File // the eventfd, non-blocking, in the runtime's poller
	ev  [8]byte
}

// iocb is struct iocb of linux/aio_abi.h: 64 bytes on every architecture.
// aio_key and aio_rw_flags swap places on big-endian machines; both are
// zero here, so one layout serves.
type iocb struct {
	data      uint64
	key       uint32
	rwFlags   int32
	opcode    uint16
	reqprio   int16
	fildes    uint32
	buf       uint64
	nbytes    uint64
	offset    int64
	reserved2 uint64
	flags     uint32
	resfd     uint32
}

// ioEvent is struct io_event of linux/aio_abi.h.
type ioEvent struct {
	data, obj uint64
	res, res2 int64
}

const (
	iocbCmdFsync  = 2 // IOCB_CMD_FSYNC
	iocbFlagResfd = 1 // IOCB_FLAG_RESFD
)

var _ [64]byte = [unsafe.Sizeof(iocb{})]byte{}

// errAIOUnsupported wraps every reason aioFsync cannot be used here: the
// kernel lacks native AIO or its fsync, a seccomp policy refuses it, or the
// system's aio-max-nr is used up. The queue then keeps blocking fsyncs.
var errAIOUnsupported = errors.New("native AIO fsync unavailable")

// newAIOFsync sets up an AIO context for one request and its eventfd.
func newAIOFsync() (*aioFsync, error) {
	var ctx uintptr
	if _, _, e := syscall.RawSyscall(unix.SYS_IO_SETUP, 1, uintptr(unsafe.Pointer(&ctx)), 0); e != 0 {
		return nil, fmt.Errorf("%w: io_setup: %w", errAIOUnsupported, e)
	}
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		syscall.RawSyscall(unix.SYS_IO_DESTROY, ctx, 0, 0)
		return nil, fmt.Errorf("%w: eventfd: %w", errAIOUnsupported, err)
	}
	// A non-blocking descriptor given to os.NewFile is registered with the
	// runtime's poller: Read parks the goroutine, not the thread (and Fd
	// leaves such a descriptor non-blocking; TestAIOFsync checks).
	return &aioFsync{ctx: ctx, efd: os.NewFile(uintptr(fd), "queue-aio-eventfd")}, nil
}

// fsync makes f durable: it returns once the kernel's fsync of f has
// returned, with its error. The file's descriptor is held open (Control)
// until then.
func (a *aioFsync) fsync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: err}
	}
	var ferr error
	if cerr := rc.Control(func(fd uintptr) { ferr = a.fsyncFd(fd) }); cerr != nil {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: cerr}
	}
	if ferr != nil {
		return &os.PathError{Op: "fsync", Path: f.Name(), Err: ferr}
	}
	return nil
}

func (a *aioFsync) fsyncFd(fd uintptr) error {
	cb := iocb{opcode: iocbCmdFsync, fildes: uint32(fd), flags: iocbFlagResfd, resfd: uint32(a.efd.Fd())}
	cbs := [1]*iocb{&cb}
	for {
		// io_submit copies the iocb and queues the fsync on a kernel
		// worker; it does not wait for the disk.
		_, _, e := syscall.RawSyscall(unix.SYS_IO_SUBMIT, a.ctx, 1, uintptr(unsafe.Pointer(&cbs[0])))
		if e == 0 {
			break
		}
		if e != syscall.EINTR {
			// EINVAL: the file system has no AIO fsync; ENOSYS, EPERM: the
			// kernel or a policy refuses it; EAGAIN: no room. Whatever it
			// is, nothing was submitted, and the blocking fsync the queue
			// falls back to reports the file's own error if it has one:
			// AIO never fails a commit that fsync(2) would not.
			return fmt.Errorf("%w: io_submit: %w", errAIOUnsupported, e)
		}
	}
	if _, err := a.efd.Read(a.ev[:]); err != nil {
		// Only a closed eventfd: the fsync may still be running, and
		// io_destroy (close) waits for it.
		return fmt.Errorf("wait for AIO fsync: %w", err)
	}
	// The kernel adds the event before it signals the eventfd, so a zero
	// timeout finds it; a blocking wait (nil timeout) covers the case
	// where it would not.
	var ev [1]ioEvent
	var ts syscall.Timespec
	tsp := uintptr(unsafe.Pointer(&ts))
	for {
		n, _, e := syscall.RawSyscall6(unix.SYS_IO_GETEVENTS, a.ctx, 1, 1, uintptr(unsafe.Pointer(&ev[0])), tsp, 0)
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			return fmt.Errorf("io_getevents: %w", e)
		case n == 0:
			n, _, e = syscall.Syscall6(unix.SYS_IO_GETEVENTS, a.ctx, 1, 1, uintptr(unsafe.Pointer(&ev[0])), 0, 0)
			if e == syscall.EINTR || (e == 0 && n == 0) {
				continue
			}
			if e != 0 {
				return fmt.Errorf("io_getevents: %w", e)
			}
		}
		break
	}
	if ev[0].res < 0 {
		return syscall.Errno(-ev[0].res)
	}
	return nil
}

// close waits for any fsync in flight (io_destroy does) and frees the
// context and the eventfd.
func (a *aioFsync) close() error {
	var err error
	if _, _, e := syscall.Syscall(unix.SYS_IO_DESTROY, a.ctx, 0, 0); e != 0 {
		err = fmt.Errorf("io_destroy: %w", e)
	}
	return errors.Join(err, a.efd.Close())
}

// startWriteback starts writing f's dirty pages in [off, off+n) to the
// disk without waiting for them and without a cache flush (the caller's
// fsync makes them durable). An error only leaves the pages to that fsync.
func startWriteback(f *os.File, off, n int64) {
	unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
}

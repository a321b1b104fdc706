package otacache

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync"

	"golang.org/x/sys/unix"
)

// mapping is a verified image file mapped read-only, for serving CoAP
// blocks: a 1 KiB block is then a copy from memory, not a pread (the
// syscall and its scheduler bookkeeping were 9 % of the serving CPU).
// The pages are the file's page cache, so they cost no heap and the
// kernel can reclaim them.
//
// It is only ever read through ReadAt, under mu, so unmapping (when the
// image is dropped) waits for the copies in progress and no copy can
// touch the address range afterwards, when it may hold something else.
type mapping struct {
	mu   sync.RWMutex
	data []byte // nil once unmapped
}

// errUnmapped: the image was dropped while a transfer was in progress.
var errUnmapped = errors.New("image no longer held (evicted or the cache closed)")

// mapFile maps f's first size bytes. It fails on an empty file and where
// the address space is short (a large image on a 32-bit router); the
// caller then reads the file instead.
func mapFile(f *os.File, size int64) (*mapping, error) {
	if size <= 0 || int64(int(size)) != size {
		return nil, fmt.Errorf("map %s: size %d cannot be mapped", f.Name(), size)
	}
	data, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", f.Name(), err)
	}
	return &mapping{data: data}, nil
}

// ReadAt copies from the mapping. If the file was cut short under it (only
// root can, the cache's files are 0600 and never rewritten), the copy
// faults; that is turned into an error for this transfer instead of
// ending the process.
func (m *mapping) ReadAt(p []byte, off int64) (n int, err error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.data == nil {
		return 0, errUnmapped
	}
	if off < 0 {
		return 0, fmt.Errorf("read image at offset %d: negative offset", off)
	}
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			n, err = 0, fmt.Errorf("read image at offset %d: the image file changed on disk under the cache (a fault reading its mapping: %v); restart bastiond so that it verifies its images again", off, r)
		}
	}()
	n = copy(p, m.data[off:])
	if n < len(p) {
		err = io.EOF
	}
	return n, err
}

// unmap releases the mapping once no ReadAt is in progress.
func (m *mapping) unmap() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.data == nil {
		return nil
	}
	err := unix.Munmap(m.data)
	m.data = nil
	return err
}

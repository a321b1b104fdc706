//go:build !linux

package queue

import "os"

// Elsewhere than Linux the queue's system calls keep the os.File methods
// (the raw calls are in rawio_linux.go).
const rawOffsets = false

func rawFsync(f *os.File) error { return f.Sync() }

func rawPwrite(f *os.File, b []byte, off int64) (int, error) { return f.WriteAt(b, off) }

func rawPread(f *os.File, b []byte, off int64) (int, error) { return f.ReadAt(b, off) }

//go:build !linux

package queue

import (
	"errors"
	"os"
)

// Elsewhere than Linux there is no asynchronous fsync to wait on through
// the poller (aio_linux.go): the queue's fsync blocks a thread.
type aioFsync struct{}

var errAIOUnsupported = errors.New("asynchronous fsync is Linux only")

func newAIOFsync() (*aioFsync, error) { return nil, errAIOUnsupported }

func (*aioFsync) fsync(*os.File) error { return errAIOUnsupported }

func (*aioFsync) close() error { return nil }

// startWriteback is a no-op here: the kernel writes back when it will.
func startWriteback(*os.File, int64, int64) {}

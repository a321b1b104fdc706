// Package netns runs a function inside a named Linux network namespace
// (one made by `ip netns add`, bind-mounted under /run/netns). It owns only
// the switch of the calling OS thread into and back out of the namespace; it
// never creates or deletes namespaces.
//
// Sockets opened and processes started by fn belong to the namespace: a
// socket keeps the namespace it was created in, and a child process inherits
// the namespace of the thread that forked it.
package netns

import (
	"fmt"
	"path/filepath"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// Dir is where `ip netns add` bind-mounts named namespaces.
const Dir = "/run/netns"

// Path returns the bind-mount path of the named namespace, refusing names
// that would escape Dir.
func Path(name string) (string, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return "", fmt.Errorf("netns name %q: must be a plain name as given to `ip netns add`", name)
	}
	return filepath.Join(Dir, name), nil
}

// Do runs fn on a locked OS thread switched into the named namespace and
// switches the thread back afterwards. If the thread cannot be switched back
// it is left locked, so the Go runtime discards it instead of reusing a
// thread in the wrong namespace.
func Do(name string, fn func() error) error {
	p, err := Path(name)
	if err != nil {
		return err
	}
	target, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", p, err)
	}
	defer unix.Close(target)

	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", name, err)
	}
	fnErr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Keep the thread locked: it dies with this goroutine.
		return fmt.Errorf("leave netns %s: %w (fn: %v)", name, err, fnErr)
	}
	runtime.UnlockOSThread()
	return fnErr
}

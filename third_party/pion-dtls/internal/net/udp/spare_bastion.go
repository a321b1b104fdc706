// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package udp

import "time"

// spareIdle is how long a spare goroutine waits for the next function
// before it ends.
const spareIdle = time.Second

// spareGoroutines runs functions for a listener's connections (their
// record readers) on goroutines that have run one before (Bastion patch,
// third_party/README.md (20)). A goroutine starts with a small stack, and
// a DTLS record reader grows it to several KiB, copying it each time it
// doubles (runtime.copystack: 5 % of a server's CPU per handshake when
// sessions are short). A goroutine whose function has returned waits
// spareIdle for the next one, with the stack it has grown, unless the
// listener is closed.
type spareGoroutines struct {
	work chan func()
	done <-chan struct{}
}

func newSpareGoroutines(done <-chan struct{}) *spareGoroutines {
	return &spareGoroutines{work: make(chan func()), done: done}
}

// run runs f on a waiting spare goroutine, or on a new one if none waits.
func (s *spareGoroutines) run(f func()) {
	select {
	case s.work <- f:
	default:
		go s.loop(f)
	}
}

func (s *spareGoroutines) loop(f func()) {
	var idle *time.Timer
	for {
		f()
		f = nil // nothing of it is kept while waiting
		select {
		case <-s.done:
			return
		default:
		}
		if idle == nil {
			idle = time.NewTimer(spareIdle)
		} else {
			idle.Reset(spareIdle)
		}
		select {
		case f = <-s.work:
		case <-idle.C:
			return
		case <-s.done:
			idle.Stop()

			return
		}
	}
}

// Go runs f on one of the listener's spare goroutines (see
// spareGoroutines), or a new goroutine when none is waiting: for a
// function that may block as long as the connection lives, such as its
// record reader.
func (c *PacketConn) Go(f func()) {
	c.listener.spare.run(f)
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Test of the Bastion patch (third_party/README.md, (28)): Close ends a
// Write that is blocked in the socket, as contextWithClose's goroutine per
// Write did, so that it can send close_notify.

package dtls

import (
	"sync/atomic"
	"testing"
	"time"
)

func TestBastionCloseEndsBlockedWrite(t *testing.T) {
	ca, cb, err := pipeMemory()
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()

	// cb never reads: its record reader stops taking records once its
	// buffer is full, the pipe fills, and ca's Write blocks in the pipe.
	var writes atomic.Int64
	writerDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 1000)
		for range 100000 {
			if _, err := ca.Write(buf); err != nil {
				writerDone <- err
				return
			}
			writes.Add(1)
		}
		writerDone <- nil
	}()
	deadline := time.Now().Add(10 * time.Second)
	for last := int64(-1); ; {
		time.Sleep(100 * time.Millisecond)
		n := writes.Load()
		if n == last && n > 0 {
			break // no progress for 100 ms: blocked
		}
		if time.Now().After(deadline) {
			t.Fatalf("writer never blocked (%d writes)", n)
		}
		last = n
	}

	closed := make(chan error, 1)
	go func() { closed <- ca.Close() }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return within 5 s while a Write was blocked in the socket")
	}
	select {
	case err := <-writerDone:
		if err == nil {
			t.Fatal("the blocked Write succeeded after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the blocked Write did not return within 5 s of Close")
	}
}

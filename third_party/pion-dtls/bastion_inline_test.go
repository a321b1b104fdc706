// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md):
// Conn.SetInlineReadHandler, the listener's read loop running the read
// handler of an established connection.

package dtls

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// onReadLoop reports whether the caller runs on a listener's read loop.
func onReadLoop() bool {
	buf := make([]byte, 16<<10)
	st := string(buf[:runtime.Stack(buf, false)])

	return strings.Contains(st, "udp.(*listener).readLoop")
}

// inlineRecorder is a read handler that records what it gets, where it
// runs, and fails the test if it is ever called concurrently.
type inlineRecorder struct {
	t       *testing.T
	mu      sync.Mutex
	in      bool
	got     []string
	errs    []error
	inline  int
	ended   chan struct{}
	onData  func(p []byte)
	endOnce sync.Once
	// eofOnLoop: the io.EOF came on the listener's read loop.
	eofOnLoop bool
}

func newInlineRecorder(t *testing.T) *inlineRecorder {
	t.Helper()

	return &inlineRecorder{t: t, ended: make(chan struct{})}
}

func (r *inlineRecorder) handle(p []byte, err error) {
	r.mu.Lock()
	if r.in {
		r.t.Error("read handler called concurrently")
	}
	r.in = true
	onLoop := onReadLoop()
	r.mu.Unlock()
	defer func() { r.mu.Lock(); r.in = false; r.mu.Unlock() }()
	switch {
	case errors.Is(err, io.EOF):
		r.mu.Lock()
		r.eofOnLoop = onLoop
		r.mu.Unlock()
		r.endOnce.Do(func() { close(r.ended) })
	case err != nil:
		r.mu.Lock()
		r.errs = append(r.errs, err)
		r.mu.Unlock()
	default:
		r.mu.Lock()
		r.got = append(r.got, string(p))
		if onLoop {
			r.inline++
		}
		r.mu.Unlock()
		if r.onData != nil {
			r.onData(p)
		}
	}
}

func (r *inlineRecorder) snapshot() (got []string, inline int, errs []error) {
	r.mu.Lock()
	defer r.mu.Unlock()

	return append([]string(nil), r.got...), r.inline, append([]error(nil), r.errs...)
}

// TestBastionInlineReadHandlerOrder: records reach the handler in the
// order sent, exactly once, never concurrently, whether they were queued
// for the record reader (sent before the handler was set, or while the
// reader was busy) or taken on the listener's read loop; and records of an
// established, idle session are taken on the read loop.
func TestBastionInlineReadHandlerOrder(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })

	// Three records before the handler: one queued for Read, one held by
	// the record reader (blocked on that queue, under procMu) and one in
	// the listener's packet buffer.
	var want []string
	for _, s := range []string{"a", "b", "c"} {
		want = append(want, s)
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a record queued for Read", func() bool { return len(server.decrypted) == 1 })

	rec := newInlineRecorder(t)
	rec.onData = func(p []byte) {
		if _, err := server.Write(append([]byte("echo "), p...)); err != nil {
			t.Errorf("write from handler: %v", err)
		}
	}
	if err := server.SetInlineReadHandler(rec.handle); err != nil {
		t.Fatal(err)
	}
	if err := server.SetInlineReadHandler(rec.handle); err == nil {
		t.Fatal("second SetInlineReadHandler: no error")
	}
	// Bursts of 8: some find the reader busy or records queued, most an
	// idle session. Reading the echoes paces the bursts so that loopback
	// loses nothing.
	buf := make([]byte, 64)
	readEcho := func(w string) {
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := client.Read(buf)
		if err != nil {
			t.Fatalf("read echo of %q: %v", w, err)
		}
		if string(buf[:n]) != "echo "+w {
			t.Fatalf("echo: got %q, want %q", buf[:n], "echo "+w)
		}
	}
	for _, w := range want {
		readEcho(w)
	}
	for burst := range 25 {
		var sent []string
		for i := range 8 {
			s := fmt.Sprintf("r%03d", burst*8+i)
			sent = append(sent, s)
			if _, err := client.Write([]byte(s)); err != nil {
				t.Fatal(err)
			}
		}
		for _, w := range sent {
			readEcho(w)
		}
		want = append(want, sent...)
	}
	got, inline, errs := rec.snapshot()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("records (-want +got):\n-%v\n+%v", want, got)
	}
	if len(errs) > 0 {
		t.Fatalf("handler errors: %v", errs)
	}
	// The first three cannot be inline; of the 200 after, all but those
	// that found the reader busy should be.
	if inline < 100 {
		t.Errorf("%d of %d records handled on the listener's read loop, want most", inline, len(got))
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rec.ended:
	case <-time.After(5 * time.Second):
		t.Fatal("handler never got io.EOF after the peer closed")
	}
}

// TestBastionReadHandlerNotInline: SetReadHandler (without Inline) keeps
// the handler on the connection's own record reader.
func TestBastionReadHandlerNotInline(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	rec := newInlineRecorder(t)
	got := make(chan struct{}, 4)
	rec.onData = func([]byte) { got <- struct{}{} }
	if err := server.SetReadHandler(rec.handle); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := client.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-got:
		case <-time.After(5 * time.Second):
			t.Fatal("record not delivered")
		}
	}
	if _, inline, _ := rec.snapshot(); inline != 0 {
		t.Fatalf("%d records handled on the listener's read loop, want 0", inline)
	}
}

// TestBastionInlineReadHandlerBadRecord: a record that fails to decrypt,
// taken on the read loop, is dropped silently as the record reader drops
// it (RFC 6347 4.1.2.7), and the session goes on.
func TestBastionInlineReadHandlerBadRecord(t *testing.T) {
	var mu sync.Mutex
	corrupt := false
	client, server := bastionPair(t, func(p []byte, toServer bool) bool {
		mu.Lock()
		defer mu.Unlock()
		if toServer && corrupt && len(p) > 20 && p[0] == 23 {
			p[len(p)-1] ^= 0xff // the CCM tag
			corrupt = false
		}

		return true
	})
	waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
	rec := newInlineRecorder(t)
	delivered := make(chan struct{}, 4)
	rec.onData = func([]byte) { delivered <- struct{}{} }
	if err := server.SetInlineReadHandler(rec.handle); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	corrupt = true
	mu.Unlock()
	for _, s := range []string{"bad", "good"} {
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-delivered:
	case <-time.After(5 * time.Second):
		t.Fatal("good record not delivered after a bad one")
	}
	got, inline, errs := rec.snapshot()
	if strings.Join(got, ",") != "good" || inline != 1 {
		t.Fatalf("records %v (%d inline), want [good] inline", got, inline)
	}
	if len(errs) != 0 {
		t.Fatalf("handler errors %v, want none (the bad record is dropped)", errs)
	}
}

// TestBastionInlineCloseOnReadLoop: the handler, on the read loop, closes
// its connection, the last one of a listener that is already closed (the
// Close that waits for the read loop to end): it returns, and the handler
// gets its io.EOF.
func TestBastionInlineCloseOnReadLoop(t *testing.T) {
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionPSKConfig())
	if err != nil {
		t.Fatal(err)
	}
	srvc := make(chan *Conn, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			t.Error(err)
			close(srvc)

			return
		}
		c := nc.(*Conn) //nolint:forcetypeassert
		if err := c.HandshakeContext(t.Context()); err != nil {
			t.Error(err)
		}
		srvc <- c
	}()
	client, err := Dial("udp", ln.Addr().(*net.UDPAddr), bastionPSKConfig()) //nolint:forcetypeassert
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = client.Close() }()
	if err := client.HandshakeContext(t.Context()); err != nil {
		t.Fatal(err)
	}
	server := <-srvc
	if server == nil {
		t.FailNow()
	}
	waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	rec := newInlineRecorder(t)
	closed := make(chan error, 1)
	rec.onData = func([]byte) { closed <- server.Close() }
	if err := server.SetInlineReadHandler(rec.handle); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte("bye")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close from the handler: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close from the handler on the read loop did not return")
	}
	select {
	case <-rec.ended:
	case <-time.After(5 * time.Second):
		t.Fatal("handler never got io.EOF")
	}
	if _, inline, _ := rec.snapshot(); inline != 1 {
		t.Fatalf("the record was not handled on the read loop (%d inline)", inline)
	}
}

// TestBastionInlineReadHandlerSuites: with AES-CCM-8 and AES-GCM, without
// and with connection IDs (whose records hide their content type until
// decrypted), records are taken on the read loop in order, and the peer's
// close_notify ends the session with the handler's io.EOF (with a
// connection ID it is decrypted on the read loop, a fatal alert there).
func TestBastionInlineReadHandlerSuites(t *testing.T) {
	for _, suite := range []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256} {
		for _, cid := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v/cid=%v", suite, cid), func(t *testing.T) {
				client, server, _ := bastionDirectPair(t, suite, cid)
				waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
				rec := newInlineRecorder(t)
				rec.onData = func(p []byte) {
					if _, err := server.Write(append([]byte("echo "), p...)); err != nil {
						t.Errorf("write from handler: %v", err)
					}
				}
				if err := server.SetInlineReadHandler(rec.handle); err != nil {
					t.Fatal(err)
				}
				var want []string
				buf := make([]byte, 64)
				for i := range 20 {
					s := fmt.Sprintf("m%02d", i)
					want = append(want, s)
					if _, err := client.Write([]byte(s)); err != nil {
						t.Fatal(err)
					}
					_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
					n, err := client.Read(buf)
					if err != nil || string(buf[:n]) != "echo "+s {
						t.Fatalf("echo of %q: %q, %v", s, buf[:n], err)
					}
				}
				got, inline, errs := rec.snapshot()
				if strings.Join(got, ",") != strings.Join(want, ",") || len(errs) > 0 {
					t.Fatalf("records %v errors %v, want %v", got, errs, want)
				}
				if inline < len(want)/2 {
					t.Errorf("%d of %d records on the listener's read loop, want most", inline, len(got))
				}
				if err := client.Close(); err != nil {
					t.Fatal(err)
				}
				select {
				case <-rec.ended:
				case <-time.After(5 * time.Second):
					t.Fatal("handler never got io.EOF after the peer's close_notify")
				}
			})
		}
	}
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (22) (third_party/README.md): a listener
// connection's record reader starts only when it has something to do.

package dtls

import (
	"bytes"
	"runtime/pprof"
	"strings"
	"testing"
	"time"
)

func recordReaders() int {
	var b bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2) // one stack per goroutine

	return strings.Count(b.String(), "(*Conn).readRecords(")
}

func waitEnded(t *testing.T, rec *inlineRecorder, what string) {
	t.Helper()
	select {
	case <-rec.ended:
	case <-time.After(10 * time.Second):
		t.Fatalf("read handler got no io.EOF within 10 s after %s", what)
	}
}

// TestBastionRecordReaderOnDemand: an established session whose records
// the listener's read loop takes has no record reader (only the client
// has one), and the client's close_notify is taken on the read loop too,
// which ends the session there (patch (26)): the handler gets its io.EOF
// on the read loop, and no record reader ever ran for the server.
func TestBastionRecordReaderOnDemand(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
	rec := newInlineRecorder(t)
	if err := server.SetInlineReadHandler(rec.handle); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "one record reader (the client's)", func() bool { return recordReaders() == 1 })
	for _, s := range []string{"a", "b", "c"} {
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "three records", func() bool { got, _, _ := rec.snapshot(); return len(got) == 3 })
	got, inline, errs := rec.snapshot()
	if strings.Join(got, "") != "abc" || len(errs) != 0 {
		t.Fatalf("handler got %q, errors %v; want \"abc\", none", got, errs)
	}
	if inline != 3 {
		t.Errorf("%d of 3 records handled on the read loop, want 3", inline)
	}
	if n := recordReaders(); n != 1 {
		t.Errorf("%d record readers after application data, want 1 (the client's)", n)
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	waitEnded(t, rec, "the client's close_notify")
	rec.mu.Lock()
	eofOnLoop := rec.eofOnLoop
	rec.mu.Unlock()
	if !eofOnLoop {
		t.Error("io.EOF not on the read loop: a record reader was started to end the session")
	}
	waitFor(t, "no record reader", func() bool { return recordReaders() == 0 })
}

// TestBastionRecordReaderOnDemandClose: a session closed by the server
// before its reader ever ran still ends as before: the handler gets its
// io.EOF, and Read (no handler) returns.
func TestBastionRecordReaderOnDemandClose(t *testing.T) {
	t.Run("handler", func(t *testing.T) {
		_, server := bastionPair(t, func([]byte, bool) bool { return true })
		waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
		rec := newInlineRecorder(t)
		if err := server.SetInlineReadHandler(rec.handle); err != nil {
			t.Fatal(err)
		}
		if err := server.Close(); err != nil {
			t.Fatal(err)
		}
		waitEnded(t, rec, "Close")
	})
	t.Run("read", func(t *testing.T) {
		_, server := bastionPair(t, func([]byte, bool) bool { return true })
		waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })
		done := make(chan error, 1)
		go func() {
			_, err := server.Read(make([]byte, 64))
			done <- err
		}()
		if err := server.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err == nil {
				t.Error("Read after Close: no error")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Read did not return within 10 s of Close")
		}
	})
}

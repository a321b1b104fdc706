package queue

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
)

// syncedImage records each file as its last fsync through Options.Sync
// left it: what a power cut keeps of it.
type syncedImage struct {
	mu    sync.Mutex
	files map[string][]byte
}

func (s *syncedImage) sync(f *os.File) error {
	b, err := os.ReadFile(f.Name())
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.files[filepath.Base(f.Name())] = b
	return nil
}

// cut copies dir as a power cut now would leave it: each file synced
// through Options.Sync as its last sync left it.
func (s *syncedImage) cut(t *testing.T, dir string) string {
	t.Helper()
	out := t.TempDir()
	if err := os.CopyFS(out, os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, b := range s.files {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			continue // removed since
		}
		if err := os.WriteFile(filepath.Join(out, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// devicesHeld is the devices of the messages the queue in dir holds after
// an open.
func devicesHeld(t *testing.T, dir string) string {
	t.Helper()
	q, _ := open(t, dir, Options{})
	var devs []string
	for _, e := range drain(t, q) {
		devs = append(devs, e.Device)
	}
	return strings.Join(devs, " ")
}

func padded(dev string, i int) bridges.Message {
	m := msg(dev, i)
	m.Payload = []byte(`{"pad":"` + strings.Repeat("x", 900) + `"}`)
	return m
}

// TestSyncAcksIsDurable: once SyncAcks returns, the delivered-marks of
// the Acks before it hold across a power cut at once: the messages do not
// come back at the next open. Before (an erase of a device's data used
// Ack alone), the marks waited AckFlushInterval in memory and were then
// written without an fsync, so the erased messages came back after a
// power cut and were sent to the cloud.
func TestSyncAcksIsDurable(t *testing.T) {
	ctx := context.Background()
	accept := func(t *testing.T, q *Queue, ms ...bridges.Message) []Entry {
		t.Helper()
		for _, m := range ms {
			if err := q.Accept(ctx, m); err != nil {
				t.Fatal(err)
			}
		}
		return drain(t, q)
	}
	ackDevice := func(t *testing.T, q *Queue, es []Entry, dev string) {
		t.Helper()
		for _, e := range es {
			if e.Device == dev {
				if err := q.Ack(e.Seq); err != nil {
					t.Fatal(err)
				}
			}
		}
	}

	// The marks are still in memory when SyncAcks is called.
	t.Run("pending", func(t *testing.T) {
		dir := t.TempDir()
		img := &syncedImage{files: map[string][]byte{}}
		q, _ := open(t, dir, Options{AckFlushInterval: time.Hour, Sync: img.sync})
		es := accept(t, q, msg("a", 0), msg("b", 1), msg("a", 2))
		ackDevice(t, q, es, "a")
		if err := q.SyncAcks(ctx); err != nil {
			t.Fatalf("SyncAcks: %v", err)
		}
		if got := devicesHeld(t, img.cut(t, dir)); got != "b" {
			t.Errorf("after a power cut right after SyncAcks the queue holds messages of %q, want only b's", got)
		}
	})

	// The timer wrote the marks (without an fsync) to a segment that is
	// no longer the active one when SyncAcks is called.
	t.Run("written to an earlier segment", func(t *testing.T) {
		dir := t.TempDir()
		img := &syncedImage{files: map[string][]byte{}}
		var watch atomic.Bool
		wrote := make(chan struct{}, 1)
		q, _ := open(t, dir, Options{SegmentBytes: 4 << 10, MaxBytes: 1 << 20, AckFlushInterval: time.Millisecond, Sync: img.sync,
			writeAt: func(f *os.File, b []byte, off int64) (int, error) {
				n, err := f.WriteAt(b, off)
				if watch.Load() {
					signal(wrote)
				}
				return n, err
			}})
		// Four fill the 4 KiB segment: the next message starts another.
		es := accept(t, q, padded("a", 0), padded("b", 1), padded("a", 2), padded("b", 3))
		watch.Store(true)
		ackDevice(t, q, es, "a") // b's message keeps the segment
		select {
		case <-wrote:
		case <-time.After(30 * time.Second):
			t.Fatal("the timer did not write the delivered-marks within 30s")
		}
		watch.Store(false)
		q.mu.Lock()
		first, pending := q.segs[len(q.segs)-1], len(q.acks)
		q.mu.Unlock()
		if pending > 0 {
			t.Fatalf("%d delivered-marks still in memory after the timer's write", pending)
		}
		accept(t, q, padded("c", 4))
		q.mu.Lock()
		rotated := q.segs[len(q.segs)-1] != first
		q.mu.Unlock()
		if !rotated { // its commit would have synced the marks too
			t.Fatal("the next message went to the segment of the marks: the test needs it in a new one")
		}
		if err := q.SyncAcks(ctx); err != nil {
			t.Fatalf("SyncAcks: %v", err)
		}
		if got := devicesHeld(t, img.cut(t, dir)); strings.Contains(got, "a") {
			t.Errorf("after a power cut right after SyncAcks the queue holds messages of %q, want none of a's", got)
		}
	})

	// A failed write or fsync of the marks is reported: the caller must
	// not call the deletion durable.
	t.Run("disk fails", func(t *testing.T) {
		for _, what := range []string{"write", "fsync"} {
			eio := errors.New("injected EIO")
			var fail atomic.Bool
			q, _ := open(t, t.TempDir(), Options{AckFlushInterval: time.Hour,
				Sync: func(f *os.File) error {
					if fail.Load() && what == "fsync" {
						return eio
					}
					return nil
				},
				writeAt: func(f *os.File, b []byte, off int64) (int, error) {
					if fail.Load() && what == "write" {
						return 0, eio
					}
					return f.WriteAt(b, off)
				}})
			es := accept(t, q, msg("a", 0), msg("b", 1))
			ackDevice(t, q, es, "a")
			fail.Store(true)
			if err := q.SyncAcks(ctx); !errors.Is(err, eio) {
				t.Errorf("SyncAcks with the marks' %s failing: %v, want the disk's error", what, err)
			}
			fail.Store(false)
			if err := q.SyncAcks(ctx); what == "write" && err != nil {
				t.Errorf("SyncAcks after the disk works again: %v", err)
			}
		}
	})

	t.Run("closed", func(t *testing.T) {
		q, _ := open(t, t.TempDir(), Options{})
		q.Close()
		if err := q.SyncAcks(ctx); err != ErrClosed {
			t.Errorf("SyncAcks on a closed queue: %v, want ErrClosed", err)
		}
	})
}

package queue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/prometheus/client_golang/prometheus"
)

// checkShares checks each device's count against the messages it holds:
// the bytes of its held entries and pending messages, each pointing at
// the count q.devs has for it; and that q.devs keeps few devices that hold
// nothing (see devIdleKept). open runs it after every test.
func checkShares(t *testing.T, q *Queue) {
	t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	want := map[*deviceHeld]int64{}
	for _, e := range q.ents {
		if !e.acked {
			want[e.dev] += int64(e.n)
		}
	}
	for _, p := range q.batch {
		want[p.dev] += int64(p.n)
	}
	for d, n := range want {
		if d == nil {
			t.Errorf("held messages (%d bytes) with no device count", n)
			continue
		}
		if q.devs[d.id] != d {
			t.Errorf("device %q holds %d bytes, counted in a count q.devs does not have", d.id, n)
		}
	}
	idle, busy := 0, 0
	for id, d := range q.devs {
		if d.bytes != want[d] {
			t.Errorf("device %q counted %d bytes, holds %d", id, d.bytes, want[d])
		}
		if d.bytes == 0 {
			idle++
		} else {
			busy++
		}
	}
	if idle != q.devIdle {
		t.Errorf("devIdle %d, %d devices hold nothing", q.devIdle, idle)
	}
	if len(q.devs) > 2*busy+devIdleKept+1 {
		t.Errorf("%d device counts kept, %d of them holding something: above twice those plus %d", len(q.devs), busy, devIdleKept+1)
	}
}

// refusals is bastion_queue_refusals_total{reason}.
func refusals(t *testing.T, reg *prometheus.Registry, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "bastion_queue_refusals_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// deviceBytes is what q counts as held by device id.
func deviceBytes(q *Queue, id string) int64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	if d := q.devs[id]; d != nil {
		return d.bytes
	}
	return 0
}

// shareOpts: a queue of 256 KiB whose devices may each hold 32 KiB (the
// default eighth; small messages, so that the floor of one largest record
// is below it).
var shareOpts = Options{MaxBytes: 256 << 10, SegmentBytes: 16 << 10, MaxMessageBytes: 1 << 10}

// fixed is a message of device whose record is the same size for every i
// (below a million).
func fixed(device string, i int) bridges.Message {
	return bridges.Message{Device: device, Topic: "devices/" + device + "/t/temp", QoS: 1,
		Payload: []byte(fmt.Sprintf(`{"i":%06d}`, i)), Received: epoch}
}

// flood admits device's QoS 0 messages until one is refused, and returns
// how many were admitted and the refusal. Those admitted are written when
// it returns (a QoS 1 message of another device, admitted after them, was
// made durable).
func flood(t *testing.T, q *Queue, device string) (int, error) {
	t.Helper()
	for i := range 100000 {
		m := fixed(device, i)
		m.QoS = 0
		if _, err := q.AcceptAsync(context.Background(), m); err != nil {
			if err := q.Accept(context.Background(), msg("settle", i)); err != nil {
				t.Fatalf("after the flood: %v", err)
			}
			return i, err
		}
	}
	t.Fatalf("device %s: 100000 messages admitted, none refused", device)
	return 0, nil
}

// TestDeviceShareKeepsOthersAccepted: a device that sends faster than the
// link delivers (QoS 0: no fsync to wait for; here no link at all, as in
// an outage) is refused at its share of the queue, counted and logged as
// such (one line per device a minute), and another device's messages are
// still taken. Before, the flood filled the whole queue and every device
// was refused for bytes until it drained.
func TestDeviceShareKeepsOthersAccepted(t *testing.T) {
	var logs logbuf.Buffer
	reg := prometheus.NewRegistry()
	q, err := Open(t.TempDir(), shareOpts, slog.New(slog.NewTextHandler(&logs, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkShares(t, q) })
	t.Cleanup(func() { q.Close() })
	share := q.opts.MaxDeviceBytes
	if want := shareOpts.MaxBytes / 8; share != want {
		t.Fatalf("MaxDeviceBytes %d, want the default MaxBytes/8 = %d", share, want)
	}

	n, err := flood(t, q, "flood")
	if !errors.Is(err, bridges.ErrQueueFull) || !strings.Contains(err.Error(), "share of the queue") {
		t.Fatalf("the flood's refusal after %d messages: %v; want ErrQueueFull for its share", n, err)
	}
	if held := deviceBytes(q, "flood"); held > share || held < share-int64(maxRecord(shareOpts.MaxMessageBytes)) {
		t.Fatalf("the flood holds %d bytes when refused; want its share, %d, less at most one record", held, share)
	}
	if got := refusals(t, reg, "device_share"); got != 1 {
		t.Fatalf("refusals{device_share} = %v, want 1", got)
	}
	if got := refusals(t, reg, "bytes"); got != 0 {
		t.Fatalf("refusals{bytes} = %v, want 0 (the queue is not full)", got)
	}
	// Another device: 100 messages (about a seventh of its share).
	for i := range 100 {
		if err := q.Accept(context.Background(), msg("quiet", i)); err != nil {
			t.Fatalf("the quiet device's message %d while the flood is refused: %v", i, err)
		}
	}
	// The flood keeps being refused; its log line is spaced.
	for i := range 5 {
		if _, err := q.AcceptAsync(context.Background(), fixed("flood", n+i)); !errors.Is(err, bridges.ErrQueueFull) {
			t.Fatalf("the flood's message %d after its refusal: %v, want ErrQueueFull", n+i, err)
		}
	}
	if got := refusals(t, reg, "device_share"); got != 6 {
		t.Fatalf("refusals{device_share} = %v, want 6", got)
	}
	if lines := logs.Lines("device=flood", "its share of the queue"); len(lines) != 1 {
		t.Fatalf("%d log lines about the flood's refusals, want 1 (spaced):\n%s", len(lines), logs.String())
	}
}

// TestDeviceShareReleasedByAck: delivering a device's messages gives it
// room again, as much as was delivered.
func TestDeviceShareReleasedByAck(t *testing.T) {
	q, _ := open(t, t.TempDir(), shareOpts)
	if _, err := flood(t, q, "flood"); err == nil {
		t.Fatal("no refusal")
	}
	es, err := q.Held(0, 10)
	if err != nil || len(es) != 10 {
		t.Fatalf("Held: %d entries, %v", len(es), err)
	}
	for _, e := range es {
		if err := q.Ack(e.Seq); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 10 {
		if err := q.Accept(context.Background(), fixed("flood", i)); err != nil {
			t.Fatalf("message %d after 10 delivered: %v", i, err)
		}
	}
	if err := q.Accept(context.Background(), fixed("flood", 10)); !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("the 11th message after 10 delivered: %v, want ErrQueueFull (the same size)", err)
	}
}

// TestDeviceShareRebuiltAtOpen: the counts are rebuilt from the records at
// open, delivered messages not counted: a device refused before a restart
// is refused after it, and is given room by delivery as before.
func TestDeviceShareRebuiltAtOpen(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, shareOpts)
	if _, err := flood(t, q, "flood"); err == nil {
		t.Fatal("no refusal")
	}
	// Some delivered before the restart: their marks are written at Close.
	es, err := q.Held(0, 5)
	if err != nil || len(es) != 5 {
		t.Fatalf("Held: %d entries, %v", len(es), err)
	}
	for _, e := range es {
		q.Ack(e.Seq)
	}
	before := deviceBytes(q, "flood")
	if err := q.Accept(context.Background(), msg("other", 0)); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	q2, _ := open(t, dir, shareOpts)
	if got := deviceBytes(q2, "flood"); got != before {
		t.Fatalf("after reopening, the flood counts %d bytes; it held %d", got, before)
	}
	// Fill what the 5 deliveries freed, then the next is refused. (Up to
	// 5: after the open, seqs take more bytes, see seqGap.)
	n, err := flood(t, q2, "flood")
	if n < 1 || n > 5 || !errors.Is(err, bridges.ErrQueueFull) {
		t.Fatalf("after reopening, the flood got %d more messages, then %v; want 1 to 5, then ErrQueueFull", n, err)
	}
	if err := q2.Accept(context.Background(), msg("other", 1)); err != nil {
		t.Fatalf("another device after reopening: %v", err)
	}
	es, err = q2.Held(0, 1)
	if err != nil || len(es) != 1 || es[0].Device != "flood" {
		t.Fatalf("Held: %v, %v", es, err)
	}
	q2.Ack(es[0].Seq)
	if err := q2.Accept(context.Background(), fixed("flood", 0)); err != nil {
		t.Fatalf("the flood after one of its messages was delivered: %v", err)
	}
}

// TestDeviceShareOptions: the default share, its floor of one largest
// record, and what Open refuses.
func TestDeviceShareOptions(t *testing.T) {
	for _, c := range []struct {
		o    Options
		want int64
	}{
		{Options{}, 8 << 20},
		{Options{MaxBytes: 1 << 20}, maxRecord(256 << 10)}, // 128 KiB would not take one message of 256 KiB
		{Options{MaxBytes: 1 << 20, MaxDeviceBytes: 1 << 20}, 1 << 20},
		{Options{MaxBytes: 1 << 20, MaxDeviceBytes: 2 << 20}, 2 << 20}, // above MaxBytes: the queue's bound alone
	} {
		q, _ := open(t, t.TempDir(), c.o)
		if got := q.opts.MaxDeviceBytes; got != c.want {
			t.Errorf("%+v: MaxDeviceBytes %d, want %d", c.o, got, c.want)
		}
	}
	for _, o := range []Options{
		{MaxDeviceBytes: -1},
		{MaxDeviceBytes: 256 << 10}, // one message of 256 KiB is a larger record
	} {
		q, err := Open(t.TempDir(), o, discard, nil)
		if err == nil {
			q.Close()
			t.Errorf("Open(%+v) succeeded, want a refusal", o)
		} else if !strings.Contains(err.Error(), "MaxDeviceBytes") && !strings.Contains(err.Error(), "negative") {
			t.Errorf("Open(%+v): %v, want it to name MaxDeviceBytes", o, err)
		}
	}
}

// noFsync: the tests of many devices need not wait for the disk (a
// reopen reads what the page cache holds).
var noFsync = Options{Sync: func(*os.File) error { return nil }}

// TestDeviceCountsBounded: the counts of devices that hold nothing are
// dropped, so that many devices with one message each, delivered, do not
// grow q.devs without bound (checkShares checks the bound).
func TestDeviceCountsBounded(t *testing.T) {
	q, _ := open(t, t.TempDir(), noFsync)
	for i := range 3 * devIdleKept {
		if err := q.Accept(context.Background(), msg(fmt.Sprintf("d%d", i), i)); err != nil {
			t.Fatal(err)
		}
		es, err := q.Held(0, 1)
		if err != nil || len(es) != 1 {
			t.Fatalf("Held: %v, %v", es, err)
		}
		q.Ack(es[0].Seq)
	}
	q.mu.Lock()
	n := len(q.devs)
	q.mu.Unlock()
	if n > devIdleKept+1 {
		t.Fatalf("%d device counts kept for %d devices holding nothing, want at most %d", n, 3*devIdleKept, devIdleKept+1)
	}
}

// TestDeviceCountsRebuiltForManyDevices: the counts are rebuilt right
// with more devices than devIdleKept, among them some whose messages were
// all delivered before the restart (counted nowhere) and some with
// messages held (counted, and released by delivery after the restart:
// checkShares checks every count).
func TestDeviceCountsRebuiltForManyDevices(t *testing.T) {
	dir := t.TempDir()
	q, _ := open(t, dir, noFsync)
	const devices = 3 * devIdleKept
	for i := range devices {
		for j := range 2 {
			if err := q.Accept(context.Background(), fixed(fmt.Sprintf("d%05d", i), j)); err != nil {
				t.Fatal(err)
			}
		}
	}
	want := map[string]int64{}
	es, err := q.Held(0, 2*devices)
	if err != nil || len(es) != 2*devices {
		t.Fatalf("Held: %d entries, %v", len(es), err)
	}
	for _, e := range es {
		if e.Device < fmt.Sprintf("d%05d", devices/2) {
			q.Ack(e.Seq) // half the devices: all delivered
		}
	}
	q.mu.Lock()
	for id, d := range q.devs {
		if d.bytes > 0 {
			want[id] = d.bytes
		}
	}
	q.mu.Unlock()
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}

	q2, _ := open(t, dir, noFsync)
	q2.mu.Lock()
	got := map[string]int64{}
	for id, d := range q2.devs {
		got[id] = d.bytes
	}
	q2.mu.Unlock()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after reopening, counts %v; want %v", got, want)
	}
	es, err = q2.Held(0, 2*devices)
	if err != nil || len(es) != devices {
		t.Fatalf("Held after reopening: %d entries, %v; want %d", len(es), err, devices)
	}
	for _, e := range es {
		q2.Ack(e.Seq)
	}
}

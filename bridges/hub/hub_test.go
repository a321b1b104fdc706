package hub

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/bridges"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestACL(t *testing.T) {
	for _, tc := range []struct {
		topic          string
		publish, subsc bool
	}{
		{"devices/dev1/t/temp", true, false},
		{"devices/dev1/t/room/temp", true, false},
		{"devices/dev1/s/online", true, false},
		{"devices/dev1/c/led", false, true},
		{"devices/dev1/c/#", false, true},
		{"devices/dev1/c/+/x", false, true},
		{"devices/dev1/c/#/x", false, false},
		{"devices/dev1/c", false, false},
		{"devices/dev2/t/x", false, false},
		{"devices/dev2/c/#", false, false},
		{"devices/+/c/#", false, false},
		{"devices/dev1/#", false, false},
		{"devices/dev1/+/led", false, false},
		{"#", false, false},
		{"bastion/broadcast/#", false, true},
		{"bastion/broadcast/time", false, true},
		{"$SYS/broker/uptime", false, false},
		{"$share/g/devices/dev1/c/#", false, false},
		{"devices/dev1/t/", false, false},
		{"devices/dev1/t//x", false, false},
		{"devices/dev1/t/../x", false, false},
		{"devices/dev1/t/a+b", false, false},
		{"devices/dev1/t/#", false, false},
		{"devices/dev1/x/y", false, false},
	} {
		if got := MayPublish("dev1", tc.topic); got != tc.publish {
			t.Errorf("MayPublish(dev1, %q) = %v, want %v", tc.topic, got, tc.publish)
		}
		if got := MaySubscribe("dev1", tc.topic); got != tc.subsc {
			t.Errorf("MaySubscribe(dev1, %q) = %v, want %v", tc.topic, got, tc.subsc)
		}
	}
	if MayPublish("", "devices//t/x") || MaySubscribe("", "devices//c/#") {
		t.Error("empty device allowed")
	}
}

func TestMapping(t *testing.T) {
	got := []string{}
	for _, p := range []string{"temp", "room/temp", "", "a//b", "a/#", "$x"} {
		tp, ok := TelemetryTopic("d1", p)
		got = append(got, tp+"|"+map[bool]string{true: "ok", false: "no"}[ok])
	}
	want := []string{"devices/d1/t/temp|ok", "devices/d1/t/room/temp|ok", "|no", "|no", "|no", "|no"}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("TelemetryTopic (-want +got):\n%s", d)
	}
	if tp, ok := CommandTopic("d1", ""); !ok || tp != "devices/d1/c" {
		t.Errorf("CommandTopic root = %q %v", tp, ok)
	}
	if p, ok := CommandPath("d1", "devices/d1/c/led/1"); !ok || p != "led/1" {
		t.Errorf("CommandPath = %q %v", p, ok)
	}
	if _, ok := CommandPath("d1", "devices/d2/c/led"); ok {
		t.Error("CommandPath accepted another device")
	}
}

type fullSink struct{ err error }

func (s fullSink) Accept(context.Context, bridges.Message) error { return s.err }

func TestHubRouting(t *testing.T) {
	reg := prometheus.NewRegistry()
	h, err := New(LocalSink{}, reg, discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(LocalSink{}, reg, discard); err == nil {
		t.Error("second hub on one registry: want an error")
	}
	var mirrored, observed []string
	h.AddMirror(MQTT, func(m bridges.Message) bool { mirrored = append(mirrored, m.Topic); return false })
	cancel := h.Observe("d1", "devices/d1/c/led", func(m bridges.Message) { observed = append(observed, m.Topic+"="+string(m.Payload)) })
	ctx := context.Background()
	h.Telemetry(ctx, CoAP, bridges.Message{Device: "d1", Topic: "devices/d1/t/x"})
	h.Telemetry(ctx, MQTT, bridges.Message{Device: "d1", Topic: "devices/d1/t/y"}) // not mirrored back
	if err := h.Telemetry(ctx, CoAP, bridges.Message{Device: "d1", Topic: "devices/d2/t/x"}); err == nil {
		t.Error("telemetry outside the namespace accepted")
	}
	for _, m := range []bridges.Message{
		{Device: "d1", Topic: "devices/d1/c/led", Payload: []byte("on")},
		{Device: "d1", Topic: "devices/d1/c/led/2", Payload: []byte("off")},
		{Device: "d1", Topic: "devices/d1/c/ledx", Payload: []byte("no")},
		{Device: "d2", Topic: "devices/d2/c/led", Payload: []byte("no")},
	} {
		if err := h.Deliver(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Deliver(ctx, bridges.Message{Device: "d1", Topic: "devices/d2/c/led"}); err == nil {
		t.Error("Deliver to another device's topic accepted")
	}
	cancel()
	cancel()
	h.Deliver(ctx, bridges.Message{Device: "d1", Topic: "devices/d1/c/led", Payload: []byte("late")})
	if d := cmp.Diff([]string{"devices/d1/c/led=on", "devices/d1/c/led/2=off"}, observed); d != "" {
		t.Errorf("observed (-want +got):\n%s", d)
	}
	wantM := []string{"devices/d1/t/x", "devices/d1/c/led", "devices/d1/c/led/2", "devices/d1/c/ledx", "devices/d2/c/led", "devices/d1/c/led"}
	if d := cmp.Diff(wantM, mirrored); d != "" {
		t.Errorf("mirrored (-want +got):\n%s", d)
	}
	if m, ok := h.LastCommand("devices/d1/c/led"); !ok || string(m.Payload) != "late" {
		t.Errorf("last command %q %v", m.Payload, ok)
	}
	if g := testutil.ToFloat64(h.m.Observers); g != 0 {
		t.Errorf("observers gauge %v after cancel, want 0", g)
	}
	h.Forget("d1")
	if _, ok := h.LastCommand("devices/d1/c/led"); ok {
		t.Error("Forget kept the last command")
	}

	hf, _ := New(fullSink{bridges.ErrQueueFull}, nil, discard)
	if err := hf.Telemetry(ctx, CoAP, bridges.Message{Device: "d1", Topic: "devices/d1/t/x"}); !errors.Is(err, bridges.ErrQueueFull) {
		t.Errorf("full sink: %v, want ErrQueueFull", err)
	}
	if n := testutil.ToFloat64(hf.m.Refused.WithLabelValues(CoAP, ReasonQueueFull)); n != 1 {
		t.Errorf("queue-full refusals %v, want 1", n)
	}
}

// FuzzTopicACL checks the namespace invariants of the ACL and mapping
// functions on arbitrary topics, seeded with the topics and filters the
// tests see on the wire (testdata/topics.txt).
func FuzzTopicACL(f *testing.F) {
	fh, err := os.Open("testdata/topics.txt")
	if err != nil {
		f.Fatal(err)
	}
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		if l := sc.Text(); l != "" && !strings.HasPrefix(l, "# ") {
			f.Add("dev1", l)
		}
	}
	fh.Close()
	f.Fuzz(func(t *testing.T, dev, topic string) {
		if MayPublish(dev, topic) {
			if !strings.HasPrefix(topic, "devices/"+dev+"/t/") && !strings.HasPrefix(topic, "devices/"+dev+"/s/") {
				t.Fatalf("publish allowed outside the namespace: %q %q", dev, topic)
			}
			if strings.ContainsAny(topic[len("devices/"+dev+"/"):], "+#") {
				t.Fatalf("publish allowed with a wildcard: %q", topic)
			}
		}
		if MaySubscribe(dev, topic) {
			if !strings.HasPrefix(topic, "devices/"+dev+"/c/") && !strings.HasPrefix(topic, BroadcastPrefix) {
				t.Fatalf("subscribe allowed outside the namespace: %q %q", dev, topic)
			}
		}
		if p, ok := CommandPath(dev, topic); ok {
			if ct, ok2 := CommandTopic(dev, p); !ok2 || ct != topic {
				t.Fatalf("CommandPath/CommandTopic do not round-trip: %q → %q → %q", topic, p, ct)
			}
		}
		if got, want := ValidPath(topic), splitValidPath(topic); got != want {
			t.Fatalf("ValidPath(%q) = %v, the level-splitting version says %v", topic, got, want)
		}
		if tt, ok := TelemetryTopic(dev, topic); ok && !MayPublish(dev, tt) && dev != "" {
			t.Fatalf("mapped telemetry topic %q not publishable by %q", tt, dev)
		}
	})
}

// splitValidPath is the level-splitting ValidPath that allocated on every
// message; FuzzTopicACL checks the current one agrees with it.
func splitValidPath(p string) bool {
	if p == "" || len(p) > 256 || !utf8.ValidString(p) {
		return false
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." || strings.ContainsAny(seg, "+#\x00$") {
			return false
		}
	}
	return true
}

// TestPublishACLAllocs: the check mochi runs for every PUBLISH allocates
// nothing.
func TestPublishACLAllocs(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() {
		if !MayPublish("dev-17", "devices/dev-17/t/sensors/room-2/temp") {
			t.Fatal("refused")
		}
	}); n != 0 {
		t.Errorf("MayPublish: %.1f allocations, want 0", n)
	}
}

// asyncOnlySink is a bridges.AsyncSink that cannot report by callback.
type asyncOnlySink struct{ fullSink }

func (asyncOnlySink) AcceptAsync(context.Context, bridges.Message) (<-chan error, error) {
	return nil, nil
}

// notifySink reports every QoS 1 message pending and keeps its callback.
type notifySink struct {
	asyncOnlySink
	done []func(error)
}

func (s *notifySink) AcceptNotify(_ context.Context, m bridges.Message, done func(error)) (bool, error) {
	if m.QoS == 0 {
		return false, nil
	}
	s.done = append(s.done, done)
	return true, nil
}

// Only a NotifySink (LocalSink is one) admits without waiting: a
// transport that must not block (CoAP's read loop) relies on it, and
// TelemetryNotify waits in Accept for any other Sink (pending false).
func TestTelemetryNotify(t *testing.T) {
	m := bridges.Message{Device: "d1", Topic: "devices/d1/t/x", QoS: 1}
	ns := &notifySink{}
	for _, tc := range []struct {
		name        string
		sink        bridges.Sink
		admits      bool
		wantPending bool
		wantErr     error
	}{
		{"LocalSink", LocalSink{}, true, false, nil},
		{"NotifySink", ns, true, true, nil},
		{"AsyncSink only", asyncOnlySink{}, false, false, nil},
		{"plain Sink, full", fullSink{err: bridges.ErrQueueFull}, false, false, bridges.ErrQueueFull},
	} {
		h, err := New(tc.sink, prometheus.NewRegistry(), discard)
		if err != nil {
			t.Fatal(err)
		}
		if got := h.AdmitsWithoutWaiting(); got != tc.admits {
			t.Errorf("%s: AdmitsWithoutWaiting %v, want %v", tc.name, got, tc.admits)
		}
		called := 0
		pending, err := h.TelemetryNotify(context.Background(), CoAP, m, func(error) { called++ })
		if pending != tc.wantPending || !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
			t.Errorf("%s: TelemetryNotify pending %v err %v, want %v %v", tc.name, pending, err, tc.wantPending, tc.wantErr)
		}
		if called != 0 {
			t.Errorf("%s: done called %d times before the Sink reported", tc.name, called)
		}
	}
	if len(ns.done) != 1 {
		t.Fatalf("NotifySink got %d callbacks, want 1", len(ns.done))
	}
}

// Filters and read topics are held to MaxPathLen below their root, as
// topics are: 256 bytes pass, 257 do not, in the device's command tree and
// in the broadcast tree alike (MayRead let any string below
// bastion/broadcast/ through, and the broker asks it for filters too).
func TestFilterLengthBounded(t *testing.T) {
	fits := strings.Repeat("a/", 127) + "aa"
	over := fits + "a"
	for _, root := range []string{"devices/dev1/c/", BroadcastPrefix} {
		if !MaySubscribe("dev1", root+fits) || !MayRead("dev1", root+fits) {
			t.Errorf("%s + 256 bytes refused", root)
		}
		if MaySubscribe("dev1", root+over) || MayRead("dev1", root+over) {
			t.Errorf("%s + 257 bytes allowed", root)
		}
		if MaySubscribe("dev1", root+strings.Repeat("+/", 200)+"#") {
			t.Errorf("%s + 402 bytes of wildcards allowed", root)
		}
	}
	if MayRead("dev1", BroadcastPrefix+"a//b") || MayRead("dev1", BroadcastPrefix+"#") {
		t.Error("MayRead allowed an invalid broadcast path")
	}
}

// A Sink's refusal is counted with a reason that says what failed: a full
// queue (no space left on the disk included, which the queue reports as
// full), a topic the Sink never takes, a commit that outlasted the wait's
// deadline, or a disk error.
// Other errors (the session ending) are counted for the device only.
func TestSinkRefusalReasons(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		err    error
		reason string
	}{
		{"full", fmt.Errorf("queue accept: %w", bridges.ErrQueueFull), ReasonQueueFull},
		{"no space", fmt.Errorf("%w: %w", bridges.ErrQueueFull, syscall.ENOSPC), ReasonQueueFull},
		{"topic", fmt.Errorf("upstream accept: topic too long: %w", bridges.ErrTopicRefused), ReasonTopicRefused},
		{"timeout", fmt.Errorf("waiting for disk: %w", context.DeadlineExceeded), ReasonCommitTimeout},
		{"disk", fmt.Errorf("queue stopped: %w", errors.Join(errors.New("fsync: EIO"), bridges.ErrDiskFailed)), ReasonDiskError},
		{"other", context.Canceled, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := SinkRefusal(tc.err); got != tc.reason {
				t.Errorf("SinkRefusal(%v) = %q, want %q", tc.err, got, tc.reason)
			}
			h, err := New(fullSink{tc.err}, nil, discard)
			if err != nil {
				t.Fatal(err)
			}
			if err := h.Telemetry(ctx, MQTT, bridges.Message{Device: "d1", Topic: "devices/d1/t/x"}); !errors.Is(err, tc.err) {
				t.Errorf("Telemetry: %v, want %v", err, tc.err)
			}
			want := 0
			if tc.reason != "" {
				want = 1
				if n := testutil.ToFloat64(h.m.Refused.WithLabelValues(MQTT, tc.reason)); n != 1 {
					t.Errorf("refusals{mqtt,%s} %v, want 1", tc.reason, n)
				}
			}
			if n := testutil.CollectAndCount(h.m.Refused); n != want {
				t.Errorf("%d refusal series, want %d", n, want)
			}
			if tr, _ := h.Traffic("d1"); tr.Refused != 1 || tr.MessagesIn != 0 {
				t.Errorf("device counters %+v, want 1 refused, none in", tr)
			}
		})
	}
}

// NotDurable counts telemetry that was admitted (and counted in) and then
// not made durable: once per call, with the reason of its error
// (disk_error for one it does not name), for the transport and the
// device, and it makes no row for a device forgotten meanwhile.
func TestNotDurable(t *testing.T) {
	h, err := New(LocalSink{}, nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, dev := range []string{"d1", "d2"} {
		if err := h.Telemetry(ctx, CoAP, bridges.Message{Device: dev, Topic: "devices/" + dev + "/t/x"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("telemetry: %w", context.DeadlineExceeded), ReasonCommitTimeout},
		{fmt.Errorf("queue: fsync: %w", bridges.ErrDiskFailed), ReasonDiskError},
		{errors.New("queue: disk error earlier"), ReasonDiskError},
		{fmt.Errorf("%w: %w", bridges.ErrQueueFull, syscall.ENOSPC), ReasonQueueFull},
	} {
		if got := h.NotDurable(CoAP, "d1", c.err); got != c.want {
			t.Errorf("NotDurable(%v) reason %q, want %q", c.err, got, c.want)
		}
	}
	for reason, want := range map[string]float64{ReasonCommitTimeout: 1, ReasonDiskError: 2, ReasonQueueFull: 1} {
		if n := testutil.ToFloat64(h.m.Refused.WithLabelValues(CoAP, reason)); n != want {
			t.Errorf("refusals{coap,%s} %v, want %v", reason, n, want)
		}
	}
	if tr, _ := h.Traffic("d1"); tr.Refused != 4 || tr.MessagesIn != 1 {
		t.Errorf("d1 counters %+v, want 1 in, 4 refused", tr)
	}
	h.Forget("d2")
	h.NotDurable(CoAP, "d2", bridges.ErrDiskFailed)
	if tr, ok := h.Traffic("d2"); ok {
		t.Errorf("forgotten device has counters again: %+v", tr)
	}
}

package pairing

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/internal/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

var epoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// rig is a window fed by a real button.Watcher reading input events from a
// pipe: the only way to make a button.Event is to press the button.
type rig struct {
	t       *testing.T
	w       *Window
	clk     *clock.Fake // the window's clock
	btnClk  *clock.Fake // the button watcher's clock (debounce)
	pipe    *os.File
	kernel  time.Duration // the fake kernel's event timestamps
	audits  chan AuditEvent
	reg     *prometheus.Registry
	runErr  chan error
	buttons chan button.Event
}

func newRig(t *testing.T, cfg Config) *rig {
	t.Helper()
	r := &rig{t: t, clk: clock.NewFake(epoch), btnClk: clock.NewFake(epoch), kernel: 1000 * time.Second,
		audits: make(chan AuditEvent, 4096), reg: prometheus.NewRegistry(), runErr: make(chan error, 2), buttons: make(chan button.Event)}
	rd, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	r.pipe = wr
	src, err := button.NewInputSource(rd, button.KeyWPSButton, button.Layout64)
	if err != nil {
		t.Fatal(err)
	}
	watcher, err := button.NewWatcher(src, button.Config{}, r.btnClk, discard())
	if err != nil {
		t.Fatal(err)
	}
	r.w, err = New(cfg, r.buttons, r.clk, func(e AuditEvent) { r.audits <- e }, r.reg, discard())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { r.runErr <- watcher.Run(ctx, r.buttons) }()
	go func() { r.runErr <- r.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-r.runErr
		<-r.runErr
		wr.Close()
		src.Close()
	})
	return r
}

// press holds the button for held (kernel time) and waits until the
// window has handled the press.
func (r *rig) press(held time.Duration) {
	r.t.Helper()
	var b []byte
	b = button.AppendInputEvent(b, button.InputEvent{Time: r.kernel, Type: button.EvKey, Code: button.KeyWPSButton, Value: 1}, button.Layout64)
	r.kernel += held
	b = button.AppendInputEvent(b, button.InputEvent{Time: r.kernel, Type: button.EvKey, Code: button.KeyWPSButton, Value: 0}, button.Layout64)
	r.kernel += time.Minute
	if _, err := r.pipe.Write(b); err != nil {
		r.t.Fatal(err)
	}
	select {
	case <-r.btnClk.Armed():
	case <-time.After(10 * time.Second):
		r.t.Fatal("button watcher never armed its debounce")
	}
	r.btnClk.Advance(time.Second)
}

// wait returns the next audit event with step, failing on a stray alert.
func (r *rig) wait(step Step) AuditEvent {
	r.t.Helper()
	for {
		select {
		case e := <-r.audits:
			if e.Step == step {
				return e
			}
		case <-time.After(10 * time.Second):
			r.t.Fatalf("no audit step %s", step)
		}
	}
}

func (r *rig) open() {
	r.t.Helper()
	r.press(1500 * time.Millisecond)
	r.wait(StepOpened)
	// The window armed its timeout before auditing the opening.
	select {
	case <-r.clk.Armed():
	default:
		r.t.Fatal("window opened without arming its timeout")
	}
}

func (r *rig) metric(name, label string) float64 {
	r.t.Helper()
	switch name {
	case "failures":
		return testutil.ToFloat64(r.w.failures.WithLabelValues(label))
	case "windows":
		return testutil.ToFloat64(r.w.windows.WithLabelValues(label))
	}
	return testutil.ToFloat64(r.w.enrollment)
}

func TestClosedUntilButtonThenTimeout(t *testing.T) {
	r := newRig(t, Config{})
	if _, err := r.w.Begin("dev-a"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Begin with no window: %v", err)
	}
	r.wait(StepAttemptRefused)
	if got := r.metric("failures", "no window"); got != 1 {
		t.Fatalf("no-window failures = %v", got)
	}
	// A short press opens nothing.
	r.press(300 * time.Millisecond)
	if r.w.IsOpen() {
		t.Fatal("short press opened the window")
	}
	r.open()
	st := r.w.State()
	if !st.Open || st.Remaining != DefaultDuration || !st.OpenedAt.Equal(epoch) || st.MaxFail != 10 {
		t.Fatalf("state after open: %+v", st)
	}
	r.clk.Advance(DefaultDuration - time.Second)
	if !r.w.IsOpen() || r.w.State().Remaining != time.Second {
		t.Fatalf("closed early: %+v", r.w.State())
	}
	r.clk.Advance(time.Second)
	if e := r.wait(StepClosed); e.Reason != ReasonTimeout {
		t.Fatalf("closed for %q", e.Reason)
	}
	if _, err := r.w.Begin("dev-a"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Begin after timeout: %v", err)
	}
	st = r.w.State()
	if st.Open || st.LastClose == nil || st.LastClose.Reason != ReasonTimeout || st.LastClose.ClosedAt.Sub(st.LastClose.OpenedAt) != DefaultDuration {
		t.Fatalf("state after timeout: %+v", st)
	}
}

func TestEnrollmentClosesWindow(t *testing.T) {
	r := newRig(t, Config{Duration: 5 * time.Minute})
	r.open()
	if got := r.w.State().Remaining; got != 5*time.Minute {
		t.Fatalf("remaining %v", got)
	}
	a, err := r.w.Begin("dev-a")
	if err != nil {
		t.Fatal(err)
	}
	if st := r.w.State(); st.Enrolling != "dev-a" {
		t.Fatalf("enrolling %q", st.Enrolling)
	}
	if err := a.Succeed(); err != nil {
		t.Fatal(err)
	}
	if e := r.wait(StepClosed); e.Reason != ReasonEnrolled || e.Device != "dev-a" {
		t.Fatalf("close %+v", e)
	}
	if _, err := r.w.Begin("dev-b"); !errors.Is(err, ErrClosed) {
		t.Fatalf("second device after enrollment: %v", err)
	}
	if err := a.Succeed(); err == nil {
		t.Fatal("attempt succeeded twice")
	}
	if r.metric("enrollments", "") != 1 || r.metric("windows", string(ReasonEnrolled)) != 1 {
		t.Fatal("enrollment metrics not counted")
	}
}

func TestFailuresCloseWindow(t *testing.T) {
	r := newRig(t, Config{})
	r.open()
	for i := 1; i <= 10; i++ {
		a, err := r.w.Begin("dev-a")
		if err != nil {
			t.Fatalf("attempt %d: %v", i, err)
		}
		a.Fail("wrong setup code")
		a.Fail("counted once only")
		if open := r.w.IsOpen(); open != (i < 10) {
			t.Fatalf("after %d failures open=%v", i, open)
		}
	}
	if e := r.wait(StepClosed); e.Reason != ReasonTooManyFailures {
		t.Fatalf("closed for %q", e.Reason)
	}
	if got := r.metric("failures", "attempt failed"); got != 10 {
		t.Fatalf("failures = %v", got)
	}
	if st := r.w.State(); st.LastClose.Failures != 10 {
		t.Fatalf("closure failures %d", st.LastClose.Failures)
	}
}

func TestSameDeviceRetryCountsAsFailure(t *testing.T) {
	r := newRig(t, Config{MaxFailures: 2})
	r.open()
	first, _ := r.w.Begin("dev-a")
	second, err := r.w.Begin("dev-a")
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Succeed(); !errors.Is(err, ErrAttemptOver) {
		t.Fatalf("superseded attempt succeeded: %v", err)
	}
	if st := r.w.State(); st.Failures != 1 || !st.Open {
		t.Fatalf("state %+v", st)
	}
	if _, err := r.w.Begin("dev-a"); !errors.Is(err, ErrClosed) {
		t.Fatalf("third attempt with max 2: %v", err)
	}
	if err := second.Succeed(); err == nil {
		t.Fatal("attempt survived the window closing")
	}
}

func TestSessionOverlapAbortsWindow(t *testing.T) {
	r := newRig(t, Config{})
	r.open()
	a, err := r.w.Begin("dev-a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.w.Begin("dev-b"); !errors.Is(err, ErrSessionOverlap) {
		t.Fatalf("second device: %v", err)
	}
	alert := r.wait(StepOverlapAlert)
	if !alert.Alert || alert.Device != "dev-b" || !strings.Contains(alert.Detail, "dev-a") {
		t.Fatalf("alert %+v", alert)
	}
	if e := r.wait(StepClosed); e.Reason != ReasonSessionOverlap {
		t.Fatalf("closed for %q", e.Reason)
	}
	if err := a.Succeed(); !errors.Is(err, ErrSessionOverlap) {
		t.Fatalf("first device after overlap: %v", err)
	}
	if _, err := r.w.Begin("dev-a"); !errors.Is(err, ErrClosed) {
		t.Fatalf("after abort: %v", err)
	}
	if r.metric("failures", "session overlap") != 1 || r.metric("enrollments", "") != 0 {
		t.Fatal("overlap metrics wrong")
	}
}

func TestLongPressCancels(t *testing.T) {
	r := newRig(t, Config{})
	r.press(11 * time.Second) // nothing open: a gesture of its own
	if e := r.wait(StepLongPressIdle); !strings.Contains(e.Detail, "no window open") {
		t.Fatalf("long press with no window: %+v", e)
	}
	r.open()
	a, _ := r.w.Begin("dev-a")
	r.press(10 * time.Second)
	if e := r.wait(StepClosed); e.Reason != ReasonCancelled {
		t.Fatalf("closed for %q", e.Reason)
	}
	if err := a.Succeed(); err == nil {
		t.Fatal("attempt survived cancel")
	}
}

func TestOpenPressDoesNotExtend(t *testing.T) {
	r := newRig(t, Config{})
	r.open()
	r.clk.Advance(100 * time.Second)
	r.press(2 * time.Second)
	r.wait(StepButtonIgnored)
	if got := r.w.State().Remaining; got != 20*time.Second {
		t.Fatalf("remaining %v after second press, want 20s", got)
	}
}

func TestSucceedAfterTimeoutWithheld(t *testing.T) {
	r := newRig(t, Config{})
	r.open()
	a, err := r.w.Begin("dev-a")
	if err != nil {
		t.Fatal(err)
	}
	r.clk.Advance(DefaultDuration)
	if err := a.Succeed(); !errors.Is(err, ErrAttemptOver) {
		t.Fatalf("Succeed after timeout: %v", err)
	}
	if r.metric("enrollments", "") != 0 {
		t.Fatal("late enrollment counted")
	}
}

func TestHistoryBounded(t *testing.T) {
	r := newRig(t, Config{})
	for range historySize + 3 {
		r.open()
		r.press(12 * time.Second)
		r.wait(StepClosed)
	}
	st := r.w.State()
	if len(st.History) != historySize || st.LastClose.Reason != ReasonCancelled {
		t.Fatalf("history %d, last %+v", len(st.History), st.LastClose)
	}
}

func TestButtonSourceGone(t *testing.T) {
	ch := make(chan button.Event)
	w, err := New(Config{}, ch, clock.NewFake(epoch), func(AuditEvent) {}, prometheus.NewRegistry(), discard())
	if err != nil {
		t.Fatal(err)
	}
	close(ch)
	if err := w.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "button") {
		t.Fatalf("Run with closed button channel: %v", err)
	}
	// A forged zero event opens nothing.
	ch2 := make(chan button.Event, 1)
	audits := make(chan AuditEvent, 10)
	w2, _ := New(Config{}, ch2, clock.NewFake(epoch), func(e AuditEvent) { audits <- e }, prometheus.NewRegistry(), discard())
	ch2 <- button.Event{}
	close(ch2)
	w2.Run(context.Background())
	if e := <-audits; e.Step != StepButtonIgnored {
		t.Fatalf("zero event: %+v", e)
	}
	if w2.IsOpen() {
		t.Fatal("zero event opened the window")
	}
}

// TestNoMethodOpensWindow pins the exported surface of Window: none of
// these opens it, and adding one must come through review of this list.
func TestNoMethodOpensWindow(t *testing.T) {
	var got []string
	tp := reflect.TypeOf(&Window{})
	for i := range tp.NumMethod() {
		got = append(got, tp.Method(i).Name)
	}
	sort.Strings(got)
	want := []string{"Begin", "IsOpen", "Run", "State"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("Window methods (-want +got):\n%s", diff)
	}
}

func TestConfigValidate(t *testing.T) {
	cases := map[string]struct {
		c    Config
		want string
	}{
		"defaults":         {Config{}, ""},
		"max":              {Config{Duration: 15 * time.Minute}, ""},
		"too long":         {Config{Duration: 15*time.Minute + time.Second}, "pairing.window"},
		"too short":        {Config{Duration: time.Second}, "pairing.window"},
		"negative":         {Config{Duration: -time.Minute}, "pairing.window"},
		"failures over 10": {Config{MaxFailures: 11}, "pairing.max_failures"},
		"failures neg":     {Config{MaxFailures: -1}, "pairing.max_failures"},
	}
	for name, tc := range cases {
		err := tc.c.Defaults().Validate()
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want error about %q", name, err, tc.want)
		}
	}
	if _, err := New(Config{Duration: time.Hour}, make(chan button.Event), clock.NewFake(epoch), func(AuditEvent) {}, prometheus.NewRegistry(), discard()); err == nil {
		t.Error("New accepted a 1h window")
	}
	reg := prometheus.NewRegistry()
	New(Config{}, make(chan button.Event), clock.NewFake(epoch), func(AuditEvent) {}, reg, discard())
	if _, err := New(Config{}, make(chan button.Event), clock.NewFake(epoch), func(AuditEvent) {}, reg, discard()); err == nil {
		t.Error("second window registered the same metrics")
	}
}

// An attempt with no window open is what a session kept from an earlier
// window can send at the rate it likes: each is counted, handed to the
// audit func marked as a refusal (which spaces it) and not logged here.
func TestBeginWithNoWindowIsARefusal(t *testing.T) {
	var logged strings.Builder
	var got []AuditEvent
	reg := prometheus.NewRegistry()
	w, err := New(Config{}, make(chan button.Event), clock.NewFake(epoch), func(e AuditEvent) { got = append(got, e) }, reg,
		slog.New(slog.NewTextHandler(&logged, nil)))
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	for range n {
		if _, err := w.Begin("acme-t1"); !errors.Is(err, ErrClosed) {
			t.Fatalf("Begin with no window: %v, want ErrClosed", err)
		}
	}
	if _, err := w.Begin(""); err == nil {
		t.Fatal("Begin without a device accepted")
	}
	if len(got) != n+1 {
		t.Fatalf("%d audit events, want %d", len(got), n+1)
	}
	for _, e := range got[:n] {
		if e.Step != StepAttemptRefused || e.Refusal != "no window" || e.Device != "acme-t1" {
			t.Fatalf("audit event %+v, want an attempt refused as no window", e)
		}
	}
	if e := got[n]; e.Refusal != "no device identity" {
		t.Errorf("audit event %+v, want a refusal for no device identity", e)
	}
	if logged.Len() != 0 {
		t.Errorf("the window logged the refusals itself:\n%s", logged.String())
	}
	if c := testutil.ToFloat64(w.failures.WithLabelValues("no window")); c != n {
		t.Errorf("failures{no window} = %v, want %d", c, n)
	}
}

// Package pairing owns the pairing window: the short period, opened only by
// a press of the box's physical button, in which exactly one new device may
// enroll. It also holds the setup codes a person registered in advance, as
// SPAKE2+ records; the codes themselves are never kept.
//
// Nothing here can be opened from the network: a Window has no method that
// opens it. It opens only when the button channel given to New delivers a
// button.Event of kind Open, and only package button can make one. The
// console and bastionctl may read State and register setup codes; they can
// never open a window.
//
// The window closes on the first successful enrollment, on timeout, after
// MaxFailures failed attempts, on a long press (Cancel), and aborts when a
// second device tries to enroll while another's enrollment is in progress
// (WPS session overlap: both are refused and an alert is audited).
package pairing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/internal/clock"
)

// Limits of the window's duration.
const (
	DefaultDuration    = 120 * time.Second
	MaxDuration        = 15 * time.Minute
	MinDuration        = 10 * time.Second
	DefaultMaxFailures = 10
	historySize        = 32
)

// Config is the window policy.
type Config struct {
	// Duration the window stays open. Default 120s, at most 15m.
	Duration time.Duration
	// MaxFailures failed attempts close the window. Default 10, at most 10.
	MaxFailures int
}

// Defaults fills zero fields.
func (c Config) Defaults() Config {
	if c.Duration == 0 {
		c.Duration = DefaultDuration
	}
	if c.MaxFailures == 0 {
		c.MaxFailures = DefaultMaxFailures
	}
	return c
}

// Validate checks a defaulted Config. It does no I/O.
func (c Config) Validate() error {
	if c.Duration < MinDuration || c.Duration > MaxDuration {
		return fmt.Errorf("pairing.window %v: want %v to %v (default %v)", c.Duration, MinDuration, MaxDuration, DefaultDuration)
	}
	if c.MaxFailures < 1 || c.MaxFailures > DefaultMaxFailures {
		return fmt.Errorf("pairing.max_failures %d: want 1 to %d (default %d)", c.MaxFailures, DefaultMaxFailures, DefaultMaxFailures)
	}
	return nil
}

// Reason says why a window closed.
type Reason string

// The reasons a window closes.
const (
	ReasonEnrolled        Reason = "enrolled"
	ReasonTimeout         Reason = "timeout"
	ReasonTooManyFailures Reason = "too many failed attempts"
	ReasonSessionOverlap  Reason = "session overlap: a second device tried to enroll"
	ReasonCancelled       Reason = "cancelled by long button press"
	ReasonShutdown        Reason = "gateway shutting down"
)

// Step names an audited step.
type Step string

// The audited steps.
const (
	StepOpened        Step = "pairing.window_opened"
	StepClosed        Step = "pairing.window_closed"
	StepButtonIgnored Step = "pairing.button_ignored"
	// StepLongPressIdle is a long press (one that would cancel a window)
	// with no window open: the gateway makes it the physical gesture for a
	// console password recovery code.
	StepLongPressIdle   Step = "pairing.long_press_no_window"
	StepAttemptBegan    Step = "pairing.attempt_began"
	StepAttemptFailed   Step = "pairing.attempt_failed"
	StepAttemptRefused  Step = "pairing.attempt_refused"
	StepEnrolled        Step = "pairing.enrolled"
	StepOverlapAlert    Step = "pairing.session_overlap_alert"
	StepCodeRegistered  Step = "pairing.setup_code_registered"
	StepCodeRemoved     Step = "pairing.setup_code_removed"
	StepCodeExpired     Step = "pairing.setup_code_expired"
	StepCodeUnknown     Step = "pairing.setup_code_unknown"
	StepCodeRegisterErr Step = "pairing.setup_code_refused"
)

// AuditEvent is one audited step. Detail never contains secrets.
type AuditEvent struct {
	At     time.Time
	Step   Step
	Device string // the device concerned, if any
	Reason Reason // for closes
	Detail string
	Alert  bool // to be raised to the person, not only logged
	// Refusal, if set, is the kind (from a fixed set: "no window", "no
	// device identity") of a refused attempt that whoever reaches an
	// enrollment endpoint can repeat at the rate they send (a session
	// kept from an earlier window, sending after it closed). The Window
	// counts it (failures_total) but does not log it: the AuditFunc
	// spaces its audit events and log lines.
	Refusal string
}

// AuditFunc receives every step, in order, outside the window's lock, on
// the goroutine that made the step: it may call back into the Window, and
// must not wait for a lock held by a caller of the Window.
type AuditFunc func(AuditEvent)

// Errors handlers branch on.
var (
	ErrClosed         = errors.New("pairing window is closed: press the gateway's pairing button for 1 to 10 seconds, then enroll the device")
	ErrSessionOverlap = errors.New("another device tried to enroll at the same time; the window was aborted for safety: check which devices are nearby, then press the button again")
	ErrAttemptOver    = errors.New("this enrollment attempt already ended")
)

// Closure records one closed window.
type Closure struct {
	OpenedAt time.Time
	ClosedAt time.Time
	Reason   Reason
	Device   string // enrolled device, or the device(s) involved
	Failures int
}

// State is what the console shows.
type State struct {
	Open       bool
	OpenedAt   time.Time
	Deadline   time.Time
	Remaining  time.Duration
	Failures   int
	MaxFail    int
	Enrolling  string // device with an attempt in progress
	LastClose  *Closure
	History    []Closure // newest last, at most 32
	ButtonSeen time.Time // last Open or Cancel press, zero if none
}

// Window is the pairing window.
type Window struct {
	cfg     Config
	buttons <-chan button.Event
	clock   clock.Clock
	audit   AuditFunc
	log     *slog.Logger

	failures   *prometheus.CounterVec
	windows    *prometheus.CounterVec
	enrollment prometheus.Counter

	mu       sync.Mutex
	open     bool
	gen      uint64
	openedAt time.Time
	deadline time.Time
	failed   int
	current  *Attempt
	history  []Closure
	button   time.Time
	pending  []AuditEvent
}

// New makes a closed window that only the given button channel can open.
// reg receives the window's metrics; audit and log must not be nil.
func New(cfg Config, buttons <-chan button.Event, clk clock.Clock, audit AuditFunc, reg prometheus.Registerer, log *slog.Logger) (*Window, error) {
	cfg = cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if buttons == nil || clk == nil || audit == nil || reg == nil || log == nil {
		return nil, errors.New("pairing window: buttons, clock, audit, registerer and logger are required")
	}
	w := &Window{cfg: cfg, buttons: buttons, clock: clk, audit: audit, log: log.With("component", "pairing")}
	w.failures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "bastion", Subsystem: "pairing", Name: "failures_total",
		Help: "Refused or failed enrollment attempts, by reason.",
	}, []string{"reason"})
	w.windows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "bastion", Subsystem: "pairing", Name: "windows_closed_total",
		Help: "Pairing windows closed, by reason.",
	}, []string{"reason"})
	w.enrollment = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "bastion", Subsystem: "pairing", Name: "enrollments_total",
		Help: "Devices enrolled through a pairing window.",
	})
	for _, c := range []prometheus.Collector{w.failures, w.windows, w.enrollment} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("pairing window: register metrics: %w", err)
		}
	}
	return w, nil
}

// record queues an audit event; callers hold mu and call flush after
// unlocking, so audit callbacks may call back into the Window.
func (w *Window) record(e AuditEvent) {
	e.At = w.clock.Now()
	w.pending = append(w.pending, e)
}

func (w *Window) unlockAndFlush() {
	evs := w.pending
	w.pending = nil
	w.mu.Unlock()
	for _, e := range evs {
		if e.Refusal != "" {
			w.audit(e) // spaced and logged there
			continue
		}
		lvl := slog.LevelInfo
		if e.Alert {
			lvl = slog.LevelWarn
		}
		w.log.Log(context.Background(), lvl, string(e.Step), "device", e.Device, "reason", string(e.Reason), "detail", e.Detail)
		w.audit(e)
	}
}

// closeLocked closes an open window.
func (w *Window) closeLocked(r Reason, device string) {
	if !w.open {
		return
	}
	c := Closure{OpenedAt: w.openedAt, ClosedAt: w.clock.Now(), Reason: r, Device: device, Failures: w.failed}
	w.open = false
	w.gen++
	if w.current != nil {
		w.current.over = true
		w.current.abort = ErrAttemptOver
		if r == ReasonSessionOverlap {
			w.current.abort = ErrSessionOverlap
		}
		w.current = nil
	}
	w.history = append(w.history, c)
	if len(w.history) > historySize {
		w.history = w.history[len(w.history)-historySize:]
	}
	w.windows.WithLabelValues(string(r)).Inc()
	w.record(AuditEvent{Step: StepClosed, Device: device, Reason: r, Detail: fmt.Sprintf("open %v, %d failed attempts", c.ClosedAt.Sub(c.OpenedAt), c.Failures)})
}

// expireLocked closes the window if its deadline passed, whoever notices
// first (Run's timer or a handler).
func (w *Window) expireLocked() {
	if w.open && !w.clock.Now().Before(w.deadline) {
		w.closeLocked(ReasonTimeout, "")
	}
}

// Run consumes button presses and closes the window on timeout, until ctx
// ends (it then closes an open window) or the button channel closes (an
// error: without its button the gateway can never pair).
func (w *Window) Run(ctx context.Context) error {
	var timeout <-chan time.Time
	var timeoutGen uint64
	for {
		select {
		case <-ctx.Done():
			w.mu.Lock()
			w.closeLocked(ReasonShutdown, "")
			w.unlockAndFlush()
			return nil
		case ev, ok := <-w.buttons:
			if !ok {
				w.mu.Lock()
				w.closeLocked(ReasonShutdown, "")
				w.unlockAndFlush()
				return errors.New("pairing window: the button source stopped; no device can be paired until it is back")
			}
			w.mu.Lock()
			armed := w.pressLocked(ev)
			if armed {
				timeout, timeoutGen = w.clock.After(w.cfg.Duration), w.gen
			}
			w.unlockAndFlush()
		case <-timeout:
			timeout = nil
			w.mu.Lock()
			if w.gen == timeoutGen {
				w.expireLocked()
			}
			w.unlockAndFlush()
		}
	}
}

// pressLocked applies a button press; it reports whether a window opened.
func (w *Window) pressLocked(ev button.Event) bool {
	w.expireLocked()
	switch ev.Kind() {
	case button.Open:
		w.button = w.clock.Now()
		if w.open {
			w.record(AuditEvent{Step: StepButtonIgnored, Detail: "open press while a window is already open; it is not extended"})
			return false
		}
		w.open = true
		w.gen++
		w.openedAt = w.clock.Now()
		w.deadline = w.openedAt.Add(w.cfg.Duration)
		w.failed = 0
		w.record(AuditEvent{Step: StepOpened, Detail: fmt.Sprintf("button %s held %v; open for %v", ev.Source(), ev.Held(), w.cfg.Duration)})
		return true
	case button.Cancel:
		w.button = w.clock.Now()
		if !w.open {
			w.record(AuditEvent{Step: StepLongPressIdle, Detail: fmt.Sprintf("button %s held %v with no window open", ev.Source(), ev.Held())})
			return false
		}
		w.closeLocked(ReasonCancelled, "")
	default:
		w.record(AuditEvent{Step: StepButtonIgnored, Detail: fmt.Sprintf("event of unknown kind %v", ev.Kind())})
	}
	return false
}

// Attempt is one device's enrollment in an open window.
type Attempt struct {
	w      *Window
	gen    uint64
	device string
	over   bool
	abort  error // why the window ended under this attempt, if it did
}

// Device is the device the attempt is for.
func (a *Attempt) Device() string { return a.device }

// Begin claims the open window for device (the identity it claims: its
// setup-code device ID or IDevID subject). It fails with ErrClosed when no
// window is open, and with ErrSessionOverlap when another device's attempt
// is in progress, in which case the window is aborted and that attempt
// fails too. A new attempt by the same device replaces its previous one,
// which counts as failed.
func (w *Window) Begin(device string) (*Attempt, error) {
	w.mu.Lock()
	defer w.unlockAndFlush()
	if device == "" {
		w.failures.WithLabelValues("no device identity").Inc()
		w.record(AuditEvent{Step: StepAttemptRefused, Detail: "attempt without a device identity", Refusal: "no device identity"})
		return nil, errors.New("pairing: enrollment attempt names no device")
	}
	w.expireLocked()
	if !w.open {
		w.failures.WithLabelValues("no window").Inc()
		w.record(AuditEvent{Step: StepAttemptRefused, Device: device, Detail: "no pairing window open", Refusal: "no window"})
		return nil, fmt.Errorf("enroll %s: %w", device, ErrClosed)
	}
	if cur := w.current; cur != nil {
		if cur.device != device {
			w.failures.WithLabelValues("session overlap").Inc()
			w.record(AuditEvent{Step: StepOverlapAlert, Device: device, Alert: true,
				Detail: fmt.Sprintf("device %q tried to enroll while %q was enrolling; both refused", device, cur.device)})
			w.closeLocked(ReasonSessionOverlap, cur.device+", "+device)
			return nil, fmt.Errorf("enroll %s: %w", device, ErrSessionOverlap)
		}
		cur.over = true
		w.current = nil
		if w.failLocked(device, "superseded by a new attempt from the same device") {
			return nil, fmt.Errorf("enroll %s: %w", device, ErrClosed)
		}
	}
	a := &Attempt{w: w, gen: w.gen, device: device}
	w.current = a
	w.record(AuditEvent{Step: StepAttemptBegan, Device: device})
	return a, nil
}

// failLocked counts a failure; it reports whether that closed the window.
func (w *Window) failLocked(device, why string) bool {
	w.failed++
	w.failures.WithLabelValues("attempt failed").Inc()
	w.record(AuditEvent{Step: StepAttemptFailed, Device: device, Detail: fmt.Sprintf("%s (%d of %d)", why, w.failed, w.cfg.MaxFailures)})
	if w.failed >= w.cfg.MaxFailures {
		w.closeLocked(ReasonTooManyFailures, device)
		return true
	}
	return false
}

// live reports whether the attempt still holds the open window.
func (a *Attempt) liveLocked() bool {
	a.w.expireLocked()
	return !a.over && a.w.open && a.w.gen == a.gen && a.w.current == a
}

// Succeed commits the enrollment: call it after the device proved itself
// and its credentials are ready, before sending them. If it returns an
// error (window timed out, aborted by an overlap, cancelled), the caller
// must not hand the credentials out. On success the window closes.
func (a *Attempt) Succeed() error {
	w := a.w
	w.mu.Lock()
	defer w.unlockAndFlush()
	if !a.liveLocked() {
		w.failures.WithLabelValues("attempt over").Inc()
		w.record(AuditEvent{Step: StepAttemptRefused, Device: a.device, Detail: "enrollment finished after its window closed; credentials withheld"})
		a.over = true
		err := a.abort
		if err == nil {
			err = ErrAttemptOver
		}
		return fmt.Errorf("enroll %s: %w", a.device, err)
	}
	a.over = true
	w.current = nil
	w.enrollment.Inc()
	w.record(AuditEvent{Step: StepEnrolled, Device: a.device})
	w.closeLocked(ReasonEnrolled, a.device)
	return nil
}

// Fail ends the attempt as failed (wrong setup code, bad certificate,
// malformed request); why is audited and must not contain secrets. After
// MaxFailures failures the window closes.
func (a *Attempt) Fail(why string) {
	w := a.w
	w.mu.Lock()
	defer w.unlockAndFlush()
	if !a.liveLocked() {
		a.over = true
		return
	}
	a.over = true
	w.current = nil
	w.failLocked(a.device, why)
}

// IsOpen reports whether a window is open now; enrollment endpoints exist
// only while it is.
func (w *Window) IsOpen() bool {
	w.mu.Lock()
	defer w.unlockAndFlush()
	w.expireLocked()
	return w.open
}

// State is a snapshot for the console.
func (w *Window) State() State {
	w.mu.Lock()
	defer w.unlockAndFlush()
	w.expireLocked()
	s := State{Open: w.open, Failures: w.failed, MaxFail: w.cfg.MaxFailures, ButtonSeen: w.button,
		History: append([]Closure(nil), w.history...)}
	if w.open {
		s.OpenedAt, s.Deadline = w.openedAt, w.deadline
		s.Remaining = w.deadline.Sub(w.clock.Now())
		if w.current != nil {
			s.Enrolling = w.current.device
		}
	}
	if n := len(w.history); n > 0 {
		last := w.history[n-1]
		s.LastClose = &last
	}
	return s
}

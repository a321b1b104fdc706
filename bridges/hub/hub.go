// Package hub is the one local message model both device transports share:
// telemetry a device sends over CoAP or MQTT goes to the gateway's Sink and
// is mirrored to local MQTT subscribers as devices/{id}/t/...; a command
// given to Deliver reaches the addressed device whether it observes over
// CoAP or subscribes over MQTT. The hub owns no sockets and never decides
// who a device is: the transports hand it only authenticated identities.
package hub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
)

// Transport names used in metrics and as the origin of a message.
const (
	CoAP = "coap"
	MQTT = "mqtt"
)

// Hub routes messages between the device transports, the Sink and the
// gateway.
type Hub struct {
	sink bridges.Sink
	log  *slog.Logger
	m    *Metrics

	// dmu orders command delivery: a Deliver stores the last command and
	// calls the observers under it, and ObserveLast registers an observer
	// and reads the last command under it, so no command falls between a
	// registration and its first answer, and observers see commands in
	// the order the last command changed. Lock order: dmu, then a
	// transport's session lock (inside an observer), then mu; mu is never
	// held while calling out.
	dmu     sync.Mutex
	mu      sync.RWMutex
	next    uint64
	obs     map[string]map[uint64]observer // device → observers
	mirrors map[string]func(bridges.Message) bool
	last    map[string]bridges.Message // topic → last command, bounded per device and in bytes
	nLast   map[string]int
	// lastBytes is what last holds (lastSize of each entry), at most
	// maxLastBytes; fullLogged: the refusal was logged since the last
	// command that was kept.
	lastBytes  int
	fullLogged bool
	// forgotten: devices Forget dropped (revoked), at most maxForgotten;
	// a Deliver for one keeps nothing (no last command, no traffic row),
	// until the device proves itself again (telemetry, an observer).
	forgotten  map[string]struct{}
	nForgotten atomic.Int32
	traffic    trafficTable
}

type observer struct {
	prefix string                     // full topic the observer asked for
	fn     func(bridges.Message) bool // reports whether it took the command
}

// maxLastPerDevice bounds the commands kept for plain (non-observe) GETs.
const maxLastPerDevice = 16

// maxLastBytes bounds the memory of the last commands kept over all
// devices (topic, payload and lastOverhead per entry): 4 MiB, about 16
// commands of 256 bytes for each of 1000 devices. A command that would go
// beyond it, or beyond maxLastPerDevice topics of its device, is not kept
// (counted refusals{transport="gateway",reason="commands_full"}, logged
// once until a command is kept again) and a command kept before on its
// topic is dropped, so a plain GET never returns a stale one; commands
// already kept for other devices are never evicted for it. It is still
// delivered to the device's sessions; with none, Deliver returns
// ErrCommandsFull.
const maxLastBytes = 4 << 20

// lastOverhead approximates a kept command's memory besides its topic and
// payload (map entry, Message, string headers).
const lastOverhead = 160

// maxForgotten bounds the devices remembered as forgotten.
const maxForgotten = 4096

// ErrCommandsFull: a command no device session received and that the hub
// could not keep (maxLastBytes, maxLastPerDevice): it is lost.
var ErrCommandsFull = errors.New("command neither received by a device session nor kept: the store of last commands is full")

func lastSize(m bridges.Message) int { return len(m.Topic) + len(m.Payload) + lastOverhead }

// keep stores m as its topic's last command, within the bounds; h.mu is
// held. It reports whether m was kept, and for a refusal whether the
// device is forgotten (nothing kept, nothing counted).
func (h *Hub) keep(m bridges.Message) (kept, forgotten bool) {
	if _, ok := h.forgotten[m.Device]; ok {
		return false, true
	}
	old, had := h.last[m.Topic]
	oldSize := 0
	if had {
		oldSize = lastSize(old)
	}
	if (!had && h.nLast[m.Device] >= maxLastPerDevice) || h.lastBytes-oldSize+lastSize(m) > maxLastBytes {
		if had {
			delete(h.last, m.Topic)
			h.lastBytes -= oldSize
			if h.nLast[m.Device]--; h.nLast[m.Device] <= 0 {
				delete(h.nLast, m.Device)
			}
		}
		return false, false
	}
	if !had {
		h.nLast[m.Device]++
	}
	h.last[m.Topic] = m
	h.lastBytes += lastSize(m) - oldSize
	return true, false
}

// remember ends device's forgotten state: it proved itself again (a
// session of it sent telemetry or registered an observer), so it was
// enrolled again after a revocation.
func (h *Hub) remember(device string) {
	if h.nForgotten.Load() == 0 {
		return
	}
	h.mu.Lock()
	if _, ok := h.forgotten[device]; ok {
		delete(h.forgotten, device)
		h.nForgotten.Add(-1)
	}
	h.mu.Unlock()
}

// New returns a hub that hands telemetry to sink. reg receives the transport
// metrics (shared by both transports).
func New(sink bridges.Sink, reg prometheus.Registerer, log *slog.Logger) (*Hub, error) {
	if sink == nil {
		return nil, errors.New("hub: a Sink is required")
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	return &Hub{sink: sink, log: log.With("component", "hub"), m: m,
		obs: map[string]map[uint64]observer{}, mirrors: map[string]func(bridges.Message) bool{},
		last: map[string]bridges.Message{}, nLast: map[string]int{}, forgotten: map[string]struct{}{}}, nil
}

// Metrics returns the transport metrics the hub registered.
func (h *Hub) Metrics() *Metrics { return h.m }

// AddMirror registers fn to receive every telemetry message and command
// that did not originate from the transport named origin (the MQTT broker
// registers itself so that MQTT subscribers see CoAP telemetry and
// commands). fn must not block. It reports whether it handed the message
// to a device's session (an MQTT subscriber of the topic): for a command
// that is what makes Deliver count it as received.
func (h *Hub) AddMirror(origin string, fn func(bridges.Message) bool) {
	h.mu.Lock()
	h.mirrors[origin] = fn
	h.mu.Unlock()
}

// Telemetry takes a message a device sent over transport origin. The topic
// must already be inside the device's namespace (the transports check with
// DeviceTopic). It returns once the Sink has accepted the message, so the
// transport may then acknowledge the device; bridges.ErrQueueFull is passed
// through for the transport to refuse the message.
func (h *Hub) Telemetry(ctx context.Context, origin string, m bridges.Message) error {
	return h.telemetry(origin, m, func(m bridges.Message) error { return h.sink.Accept(ctx, m) })
}

// TelemetryNotify is Telemetry for a transport that acknowledges later
// (MQTT's PUBACK pipeline, CoAP's deferred answers): it returns once the
// Sink has admitted m, and durability is reported by calling done
// (bridges.NotifySink). pending true means done is called exactly once, on
// the Sink's goroutine, and must not block; the transport may acknowledge
// the device only after done(nil). pending false: m is as accepted as err
// says. Refusals (bridges.ErrQueueFull...) are returned at once, exactly as
// from Telemetry. A Sink that is not a NotifySink is waited for here, as
// Telemetry does.
func (h *Hub) TelemetryNotify(ctx context.Context, origin string, m bridges.Message, done func(error)) (pending bool, err error) {
	err = h.telemetry(origin, m, func(m bridges.Message) error {
		var err error
		pending, err = bridges.AcceptNotify(ctx, h.sink, m, done)
		return err
	})
	return pending, err
}

// AdmitsWithoutWaiting reports whether TelemetryNotify returns without
// waiting for the Sink (the Sink is a bridges.NotifySink), so that a
// transport may call it where it must not block (CoAP answers requests on
// the DTLS listener's read loop only then).
func (h *Hub) AdmitsWithoutWaiting() bool {
	_, ok := h.sink.(bridges.NotifySink)
	return ok
}

func (h *Hub) telemetry(origin string, m bridges.Message, accept func(bridges.Message) error) error {
	if !strings.HasPrefix(m.Topic, bridges.TopicPrefix(m.Device)) {
		return fmt.Errorf("telemetry from %s on %q: topic outside the device namespace", m.Device, m.Topic)
	}
	if m.Received.IsZero() {
		m.Received = time.Now()
	}
	if err := accept(m); err != nil {
		if reason := SinkRefusal(err); reason != "" {
			h.m.Refused.WithLabelValues(origin, reason).Inc()
		}
		h.traffic.update(m.Device, func(t *Traffic) { t.Refused++ })
		return fmt.Errorf("accept telemetry from %s on %s: %w", m.Device, m.Topic, err)
	}
	h.remember(m.Device)
	h.traffic.update(m.Device, func(t *Traffic) {
		t.MessagesIn++
		t.BytesIn += uint64(len(m.Payload))
		t.LastSeen = m.Received
	})
	h.m.telemetryCounter(origin).Inc()
	h.mirror(origin, m)
	return nil
}

// SinkRefusal names, for the reason label, why the Sink did not take or
// keep a message: ReasonQueueFull (bridges.ErrQueueFull, no space left on
// the disk and a stalled device included), ReasonTopicRefused
// (bridges.ErrTopicRefused), ReasonCommitTimeout (the wait's deadline ended
// first) or ReasonDiskError (bridges.ErrDiskFailed); "" for any other
// error (the session or the gateway ending, a message the transport
// refuses itself).
func SinkRefusal(err error) string {
	switch {
	case errors.Is(err, bridges.ErrQueueFull):
		return ReasonQueueFull
	case errors.Is(err, bridges.ErrTopicRefused):
		return ReasonTopicRefused
	case errors.Is(err, context.DeadlineExceeded):
		return ReasonCommitTimeout
	case errors.Is(err, bridges.ErrDiskFailed):
		return ReasonDiskError
	}
	return ""
}

// NotDurable counts telemetry that TelemetryNotify admitted (and counted
// as accepted) but that the Sink then failed to make durable, or that was
// not durable by its deadline: the transport refused it to the device
// after all. The transport calls it once per such message, whatever it
// then does with the session. It counts the refusal for origin, with
// SinkRefusal's reason (ReasonDiskError for an error it does not name:
// a late failure is the store's), and in the device's traffic, and
// returns the reason counted. It never blocks (NotifySink callbacks call
// it).
func (h *Hub) NotDurable(origin, device string, err error) (reason string) {
	reason = SinkRefusal(err)
	if reason == "" {
		reason = ReasonDiskError
	}
	h.m.Refused.WithLabelValues(origin, reason).Inc()
	// A device forgotten meanwhile (revoked) gets no new row.
	h.traffic.updateExisting(device, func(t *Traffic) { t.Refused++ })
	return reason
}

// Deliver sends a command to a device: m.Topic must be
// devices/{m.Device}/c/... . It reaches the device's CoAP observers and MQTT
// subscriptions; a device that is not connected misses it (the last command
// per topic is kept for a plain CoAP GET and the next Observe). This is the
// entry point for the gateway itself, the upstream downlink and
// administrators. nil means the hub took the command, whether or not a
// device received it (see DeliverReached, Downlink).
func (h *Hub) Deliver(ctx context.Context, m bridges.Message) error {
	_, err := h.DeliverReached(ctx, m)
	return err
}

// Downlink is Deliver for callers that count deliveries (the upstream
// downlink): it returns bridges.ErrNoReceiver when the command was taken
// and kept but no device session received it.
func (h *Hub) Downlink(ctx context.Context, m bridges.Message) error {
	reached, err := h.DeliverReached(ctx, m)
	if err == nil && !reached {
		return bridges.ErrNoReceiver
	}
	return err
}

// DeliverReached is Deliver that also reports whether a device session got
// the command: a CoAP observer of its topic (the notification was handed
// to the listener's socket, not dropped for want of room; CoAP
// notifications are non-confirmable, so it is never known to have
// arrived) or an MQTT subscriber. It allocates nothing for
// up to four observers of the device.
func (h *Hub) DeliverReached(ctx context.Context, m bridges.Message) (reached bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if _, ok := CommandPath(m.Device, m.Topic); !ok {
		return false, fmt.Errorf("deliver command to %q on %q: the topic must be %sc/<path>", m.Device, m.Topic, bridges.TopicPrefix(m.Device))
	}
	if m.Received.IsZero() {
		m.Received = time.Now()
	}
	var buf [4]func(bridges.Message) bool
	fns := buf[:0]
	h.dmu.Lock()
	h.mu.Lock()
	kept, forgotten := h.keep(m)
	logFull := false
	if kept {
		h.fullLogged = false
	} else if !forgotten && !h.fullLogged {
		h.fullLogged, logFull = true, true
	}
	lastBytes := h.lastBytes
	for _, o := range h.obs[m.Device] {
		if topicUnder(m.Topic, o.prefix) {
			fns = append(fns, o.fn)
		}
	}
	h.mu.Unlock()
	// Under dmu: an observer registering now either read this command as
	// the last one or is called here, never neither; and two Delivers
	// reach an observer in the order they stored the last command.
	observed := false
	for _, fn := range fns {
		if fn(m) {
			observed = true
		}
	}
	h.dmu.Unlock()
	h.m.Messages.WithLabelValues("gateway", "command").Inc()
	reached = h.mirror("", m) || observed
	if !kept && !forgotten {
		h.m.Refused.WithLabelValues("gateway", ReasonCommandsFull).Inc()
		if logFull {
			h.log.Warn("hub: command not kept for the device's next GET: last-command store full (logged once until one is kept again)",
				"device", m.Device, "topic", m.Topic, "kept_bytes", lastBytes, "limit_bytes", maxLastBytes, "per_device", maxLastPerDevice, "received", reached)
		}
	}
	count := func(t *Traffic) { t.MessagesOut++; t.BytesOut += uint64(len(m.Payload)) }
	switch {
	case forgotten:
	case reached:
		h.traffic.update(m.Device, count)
	default:
		// A command no session got makes no traffic row: the cloud may
		// name device ids the gateway has never seen.
		h.traffic.updateExisting(m.Device, count)
		if !kept {
			return false, fmt.Errorf("deliver command to %s on %s: %w", m.Device, m.Topic, ErrCommandsFull)
		}
	}
	return reached, nil
}

// LastCommand returns the last command delivered on topic, if any.
func (h *Hub) LastCommand(topic string) (bridges.Message, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	m, ok := h.last[topic]
	return m, ok
}

// Observe registers fn for the commands to device whose topic is topic or
// below it. fn runs on the delivering goroutine and must not block. The
// returned function cancels the registration.
func (h *Hub) Observe(device, topic string, fn func(bridges.Message)) (cancel func()) {
	return h.ObserveLast(device, topic, func(m bridges.Message) bool { fn(m); return true }, nil)
}

// ObserveLast is Observe that also reads the last command on topic
// atomically with the registration: first (if not nil) gets it (ok false:
// none) before ObserveLast returns, and every command delivered after that
// one reaches fn, only after first has returned. So a device that starts
// observing gets each command exactly once, either in its registration
// answer or as a notification. first must not block and must not call
// the hub. fn reports whether it took the command (a CoAP observer
// refuses one too large for a notification); DeliverReached counts only
// those that did.
func (h *Hub) ObserveLast(device, topic string, fn func(bridges.Message) bool, first func(last bridges.Message, ok bool)) (cancel func()) {
	h.remember(device)
	h.dmu.Lock()
	h.mu.Lock()
	h.next++
	id := h.next
	if h.obs[device] == nil {
		h.obs[device] = map[uint64]observer{}
	}
	h.obs[device][id] = observer{prefix: topic, fn: fn}
	last, ok := h.last[topic]
	h.mu.Unlock()
	if first != nil {
		first(last, ok)
	}
	h.dmu.Unlock()
	h.m.Observers.Inc()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			delete(h.obs[device], id)
			if len(h.obs[device]) == 0 {
				delete(h.obs, device)
			}
			h.mu.Unlock()
			h.m.Observers.Dec()
		})
	}
}

// Forget drops what the hub keeps for a device (a revoked device), and
// keeps nothing for it again (a later Deliver still reaches its sessions,
// if any, but stores no last command and no traffic row) until a session
// of the device sends telemetry or observes: it was enrolled again.
func (h *Hub) Forget(device string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for t, m := range h.last {
		if strings.HasPrefix(t, bridges.TopicPrefix(device)) {
			delete(h.last, t)
			h.lastBytes -= lastSize(m)
		}
	}
	delete(h.nLast, device)
	if _, ok := h.forgotten[device]; !ok {
		if len(h.forgotten) >= maxForgotten {
			clear(h.forgotten) // bounded; what they may then keep is bounded by maxLastBytes
			h.nForgotten.Store(0)
		}
		h.forgotten[device] = struct{}{}
		h.nForgotten.Add(1)
	}
	h.forgetTraffic(device)
}

// mirror hands m to the mirrors of every origin but origin and reports
// whether one handed it to a device's session.
func (h *Hub) mirror(origin string, m bridges.Message) (reached bool) {
	h.mu.RLock()
	var fns []func(bridges.Message) bool
	for name, fn := range h.mirrors {
		if name != origin {
			fns = append(fns, fn)
		}
	}
	h.mu.RUnlock()
	for _, fn := range fns {
		if fn(m) {
			reached = true
		}
	}
	return reached
}

// topicUnder reports whether topic is prefix or a topic below it.
func topicUnder(topic, prefix string) bool {
	return topic == prefix || strings.HasPrefix(topic, strings.TrimSuffix(prefix, "/")+"/")
}

// LocalSink is the Sink the gateway uses until a durable queue is plugged
// in: it holds nothing, so a message is "accepted" once the hub has it and
// it is delivered only to local subscribers.
type LocalSink struct{}

// Accept implements bridges.Sink.
func (LocalSink) Accept(ctx context.Context, _ bridges.Message) error { return ctx.Err() }

// AcceptAsync implements bridges.AsyncSink: nothing to wait for.
func (LocalSink) AcceptAsync(ctx context.Context, _ bridges.Message) (<-chan error, error) {
	return nil, ctx.Err()
}

// AcceptNotify implements bridges.NotifySink: nothing to wait for, so done
// is never called.
func (LocalSink) AcceptNotify(ctx context.Context, _ bridges.Message, _ func(error)) (bool, error) {
	return false, ctx.Err()
}

var _ bridges.NotifySink = LocalSink{}

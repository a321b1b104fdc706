package coap

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// wellKnownCore is the resource directory (RFC 6690) a device sees.
const wellKnownCore = `</t>;rt="bastion.telemetry";ct="0 42 50 60 110 112",</c>;rt="bastion.command";obs`

// telemetryFormats are the Content-Formats accepted on /t (absent is fine):
// text/plain, octet-stream, JSON, CBOR, SenML JSON and CBOR.
var telemetryFormats = map[message.MediaType]bool{
	message.TextPlain: true, message.AppOctets: true, message.AppJSON: true,
	message.AppCBOR: true, message.AppSenmlJSON: true, message.AppSenmlCbor: true,
}

// request is what the router needs from a CoAP request, taken out of the
// go-coap message so that routing is a plain function (and fuzzable).
type request struct {
	code        codes.Code
	confirmable bool
	path        string
	observe     int64 // -1: no Observe option
	format      int64 // -1: no Content-Format
	bodySize    int64
	body        io.ReadSeeker
	// mayDefer: the caller can answer after it returned (serveSession on
	// the session's reader or the listener's read loop), so telemetry the
	// Sink has admitted but not yet made durable is answered from the
	// Sink's callback (durableAnswer) instead of waited for here.
	mayDefer bool
}

// response is what the router decided.
type response struct {
	code    codes.Code
	format  message.MediaType
	body    []byte
	maxAge  uint32 // seconds; 0: no Max-Age option
	size1   uint32 // 0: no Size1 option
	observe int    // obsNone, obsRegister, obsDeregister
	topic   string // command topic for GET /c (telemetry: its topic)

	// wait, when set, is telemetry the Sink has admitted but not yet made
	// durable (a confirmable request): the device is answered from the
	// Sink's callback or at the deadline, whichever comes first
	// (durableAnswer); the caller hands it the request (handOver).
	wait *durableAnswer
}

const (
	obsNone = iota
	obsRegister
	obsDeregister
)

func parseRequest(m *pool.Message) (request, error) {
	r := request{code: m.Code(), confirmable: m.Type() == message.Confirmable, observe: -1, format: -1}
	p, err := m.Options().Path()
	if err != nil && !errors.Is(err, message.ErrOptionNotFound) {
		return r, fmt.Errorf("Uri-Path: %w", err)
	}
	r.path = p
	if o, err := m.Observe(); err == nil {
		r.observe = int64(o)
	}
	if f, err := m.ContentFormat(); err == nil {
		r.format = int64(f)
	}
	if m.Body() != nil {
		n, err := m.BodySize()
		if err != nil {
			return r, fmt.Errorf("payload: %w", err)
		}
		r.bodySize, r.body = n, m.Body()
	}
	return r, nil
}

func diag(code codes.Code, format string, args ...any) response {
	return response{code: code, format: message.TextPlain, body: fmt.Appendf(nil, format, args...)}
}

// route decides the answer to one request from device and, for telemetry,
// hands the message to the hub (so a confirmable request is acknowledged
// only after the Sink accepted it).
func (s *Server) route(device string, r request) response {
	path := strings.TrimPrefix(r.path, "/")
	switch {
	case path == ".well-known/core":
		if r.code != codes.GET {
			return diag(codes.MethodNotAllowed, "/.well-known/core allows GET")
		}
		return response{code: codes.Content, format: message.AppLinkFormat, body: []byte(wellKnownCore)}
	case path == "t" || strings.HasPrefix(path, "t/"):
		if r.code != codes.POST {
			return diag(codes.MethodNotAllowed, "/t allows POST")
		}
		return s.telemetry(device, strings.TrimPrefix(strings.TrimPrefix(path, "t"), "/"), r)
	case path == "c" || strings.HasPrefix(path, "c/"):
		if r.code != codes.GET {
			return diag(codes.MethodNotAllowed, "/c allows GET (with Observe)")
		}
		return s.command(device, strings.TrimPrefix(strings.TrimPrefix(path, "c"), "/"), r)
	}
	return diag(codes.NotFound, "no resource %q; see /.well-known/core", r.path)
}

func (s *Server) telemetry(device, path string, r request) response {
	topic, ok := hub.TelemetryTopic(device, path)
	if !ok {
		s.deviceLine(slog.LevelInfo, "bad_path", device, "coap: telemetry refused: bad path", "path", ratelog.Clip(r.path, ratelog.MaxText))
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
		return diag(codes.BadRequest, "telemetry needs a path /t/{segment}/...: non-empty segments without + # $")
	}
	if r.bodySize > int64(s.cfg.MaxPayload) {
		s.deviceLine(slog.LevelWarn, "too_large", device, "coap: telemetry refused: payload too large", "topic", topic, "size", r.bodySize, "limit", s.cfg.MaxPayload)
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonTooLarge).Inc()
		res := diag(codes.RequestEntityTooLarge, "payload %d bytes, limit %d", r.bodySize, s.cfg.MaxPayload)
		res.size1 = uint32(s.cfg.MaxPayload)
		return res
	}
	if r.format >= 0 && !telemetryFormats[message.MediaType(r.format)] {
		s.deviceLine(slog.LevelInfo, "format", device, "coap: telemetry refused: unsupported content format", "format", r.format)
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
		return diag(codes.UnsupportedMediaType, "content format %d not accepted; use 0, 42, 50, 60, 110 or 112", r.format)
	}
	var payload []byte
	if r.body != nil && r.bodySize > 0 {
		payload = make([]byte, r.bodySize)
		if _, err := r.body.Seek(0, io.SeekStart); err != nil {
			return diag(codes.BadRequest, "payload unreadable")
		}
		if _, err := io.ReadFull(r.body, payload); err != nil {
			return diag(codes.BadRequest, "payload unreadable")
		}
	}
	// A CON request is answered, within a bound (acceptTimeout, shared per
	// second), once the message is durable; a NON request once it is
	// admitted. The Sink admits without waiting where it can (a
	// NotifySink): the answer is then given later (otacache's Defer), from
	// the Sink's callback after the fsync, instead of holding up the
	// session, and with no goroutine parked per request.
	now := time.Now()
	var qos byte
	if r.confirmable {
		qos = 1
	}
	ctx := s.deadline.ForQoS(qos, now)
	m := bridges.Message{Device: device, Topic: topic, Payload: payload, QoS: qos, Received: now}
	if !r.mayDefer {
		return s.telemetryAnswer(device, topic, s.hub.Telemetry(ctx, hub.CoAP, m))
	}
	a := &durableAnswer{s: s, device: device, topic: topic, ctx: ctx}
	pending, err := s.hub.TelemetryNotify(ctx, hub.CoAP, m, a.done)
	if err == nil && pending {
		return response{code: codes.Changed, wait: a}
	}
	return s.telemetryAnswer(device, topic, err)
}

// telemetryAnswer is the answer to telemetry the Sink accepted (err nil)
// or refused.
func (s *Server) telemetryAnswer(device, topic string, err error) response {
	if err == nil {
		return response{code: codes.Changed}
	}
	if errors.Is(err, bridges.ErrTopicRefused) {
		// Sending it again cannot succeed: a client error, not "retry later".
		s.deviceLine(slog.LevelWarn, "topic_refused", device, "coap: telemetry refused: the upstream link refuses its topic", "topic", topic, "err", err)
		return diag(codes.BadRequest, "topic refused by the gateway's upstream limits; use a shorter topic with fewer levels")
	}
	// The device gets the same answer for a full queue and a deadline
	// that passed (both mean: retry later); the log says which it was, so
	// that whoever reads it looks at the backlog or at the disk.
	switch reason := hub.SinkRefusal(err); reason {
	case hub.ReasonQueueFull, hub.ReasonCommitTimeout:
		msg := "coap: telemetry refused: queue full, device asked to retry"
		if reason == hub.ReasonCommitTimeout {
			msg = "coap: telemetry refused: not made durable within the commit deadline (slow disk), device asked to retry"
		}
		s.deviceLine(slog.LevelWarn, reason, device, msg, "topic", topic, "reason", reason, "retry_after", s.cfg.RetryAfter, "err", err)
		res := diag(codes.ServiceUnavailable, "gateway queue full; retry after %d s", int(s.cfg.RetryAfter.Seconds()))
		res.maxAge = uint32(s.cfg.RetryAfter.Seconds())
		return res
	case hub.ReasonDiskError:
		s.log.Error("coap: telemetry not accepted: the gateway's disk failed to store it", "device", device, "topic", topic, "reason", reason, "err", err)
		return diag(codes.InternalServerError, "telemetry not accepted")
	default:
		s.log.Error("coap: telemetry not accepted", "device", device, "topic", topic, "err", err)
		return diag(codes.InternalServerError, "telemetry not accepted")
	}
}

func (s *Server) command(device, path string, r request) response {
	topic, ok := hub.CommandTopic(device, path)
	if !ok {
		s.deviceLine(slog.LevelInfo, "bad_path", device, "coap: command read refused: bad path", "path", ratelog.Clip(r.path, ratelog.MaxText))
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
		return diag(codes.BadRequest, "command path /c/{segment}/...: non-empty segments without + # $")
	}
	res := response{code: codes.Content, format: message.AppOctets, topic: topic}
	switch r.observe {
	case 0:
		// The last command is read in answer, atomically with the
		// registration (session.observe).
		res.observe = obsRegister
		return res
	case 1:
		res.observe = obsDeregister
	}
	if m, ok := s.hub.LastCommand(topic); ok {
		res.body = m.Payload
	}
	return res
}

// serveCoAP answers one request (otacache.ServeDTLS calls it on the
// session's record reader, or for a device session on the listener's read
// loop: see inline): identity from the session, then route.
func (s *Server) serveCoAP(w *otacache.DTLSResponseWriter, m *pool.Message) {
	se := s.sessionOf(w.Session())
	if se == nil {
		// No identity (the session was refused after its handshake, its
		// refusal counted there): say so and let the close that is under
		// way finish. Counted too, as the peer chose to send it.
		s.refusalLine("no_session", "coap: request refused: the DTLS session has no device (refused after its handshake, closing); answered 4.01",
			"device", "", "remote", w.Session().RemoteAddr().String())
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonNoSession).Inc()
		w.SetResponse(codes.Unauthorized, message.TextPlain, bytes.NewReader([]byte("no device session")))
		return
	}
	if se.inline && mayBlock(m) {
		// On the read loop nothing may wait: the request is answered
		// from a goroutine of its own, at most maxBlockingPerSession at
		// once per session. Without a bound a device pipelining requests
		// with distinct message ids while the store is slow parked a
		// goroutine for each, and grew its response cache's pending list,
		// which every datagram of the session scans.
		if se.blocking.Add(1) > maxBlockingPerSession {
			se.blocking.Add(-1)
			s.busy(w, m, se)
			return
		}
		d := w.Defer()
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			s.serveSession(w, m, se, false)
			d.Done()
			se.blocking.Add(-1)
		}()
		return
	}
	s.serveSession(w, m, se, true)
}

// refuseEnded answers m 4.01: se was ended (revoked, or its certificate
// no longer accepted) and is being closed. Counted under the reason its
// end was, as the device's other refusals are (a handshake, a session
// refused after its handshake), and logged as a refusal of what se sent.
func (s *Server) refuseEnded(w *otacache.DTLSResponseWriter, m *pool.Message, se *session, reason string) {
	s.sessionLine(se, slog.LevelInfo, "ended", "coap: request refused: the session was ended (its device or certificate is no longer accepted) and is closing; answered 4.01",
		"reason", reason, "path", ratelog.Clip(pathOf(m), ratelog.MaxText))
	s.m.Refused.WithLabelValues(hub.CoAP, reason).Inc()
	if err := w.SetResponse(codes.Unauthorized, message.TextPlain, bytes.NewReader([]byte("session ended: credentials no longer accepted"))); err != nil {
		s.log.Debug("coap: response not set", "device", se.device, "err", err)
	}
}

// maxBlockingPerSession bounds the requests of one session answered on
// goroutines of their own (mayBlock: a firmware status report, an EST
// request) at once. A device sends one such request at a time (a status
// report, a certificate renewal); eight leave room for retries.
const maxBlockingPerSession = 8

// busyRetryAfter is the Max-Age of the 5.03 a request past
// maxBlockingPerSession gets: the ones in flight wait for the store, which
// answers in milliseconds when it is well.
const busyRetryAfter = 5 * time.Second

// busy answers m 5.03 with Max-Age busyRetryAfter: its session already has
// maxBlockingPerSession requests waiting (counted reason="busy").
func (s *Server) busy(w *otacache.DTLSResponseWriter, m *pool.Message, se *session) {
	// One line per device per interval: a device pipelining requests
	// refuses many.
	s.sessionLine(se, slog.LevelWarn, "busy", "coap: request refused: the session has as many requests waiting for the store as it may; answered 5.03, the device should retry",
		"path", ratelog.Clip(pathOf(m), ratelog.MaxText), "limit", maxBlockingPerSession, "retry_after", busyRetryAfter)
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBusy).Inc()
	res := diag(codes.ServiceUnavailable, "%d requests of this session are waiting for the gateway's store; retry after %d s",
		maxBlockingPerSession, int(busyRetryAfter.Seconds()))
	res.maxAge = uint32(busyRetryAfter.Seconds())
	s.answer(w, m, se, res)
}

// pathOf is m's Uri-Path, "" if it has none or it does not join.
func pathOf(m *pool.Message) string {
	p, _ := m.Options().Path()
	return p
}

// mayBlock reports whether answering m may wait (for the store or the
// disk): an EST request (a certificate is issued and stored) or a
// firmware status report (stored). Everything else a device session asks
// is answered from memory, the Sink's admission (which does not wait:
// inline), or a block of a cached image (a read, as any event-loop server
// makes). It looks at the Uri-Path options without joining them.
func mayBlock(m *pool.Message) bool {
	first := true
	for _, o := range m.Options() {
		if o.ID != message.URIPath {
			continue
		}
		if first {
			if string(o.Value) == fwStatusResource {
				return true
			}
			if string(o.Value) != ".well-known" {
				return false
			}
			first = false
			continue
		}
		return string(o.Value) == "est"
	}
	return false
}

// inline reports whether cc's requests may be answered on the DTLS
// listener's read loop (otacache's DTLSServeConfig.Inline, which saves a
// goroutine hand-off per request): for a device session, when the Sink
// admits telemetry without waiting. Enrollment sessions (PAKE, EST) wait
// for the store and keep their record reader.
func (s *Server) inline(cc *otacache.DTLSConn) bool {
	se := s.sessionOf(cc)
	if se == nil || se.enroll.kind != KindDevice || !s.hub.AdmitsWithoutWaiting() {
		return false
	}
	se.inline = true
	return true
}

// responseSetter is an answer being built: the response writer, or the
// deferred answer after otacache's Defer.
type responseSetter interface {
	SetResponse(code codes.Code, cf message.MediaType, d io.ReadSeeker, opts ...message.Option) error
}

// serveSession answers m from session se. canDefer: it runs on the
// session's reader (or the listener's read loop), so telemetry waiting for
// the disk is answered later, from the Sink's callback; otherwise it runs
// on a goroutine of its own and may wait here.
func (s *Server) serveSession(w *otacache.DTLSResponseWriter, m *pool.Message, se *session, canDefer bool) {
	if reason, _ := se.ended.Load().(string); reason != "" {
		s.refuseEnded(w, m, se, reason)
		return
	}
	// Firmware is for operational sessions only (enroll.go: session kinds).
	if se.enroll.kind == KindDevice && s.serveFirmware(w, m, se) {
		return
	}
	r, err := parseRequest(m)
	var res response
	if err != nil {
		s.sessionLine(se, slog.LevelInfo, "malformed", "coap: request refused: malformed", "err", ratelog.ClipErr(err))
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest).Inc()
		res = diag(codes.BadRequest, "malformed request: %v", err)
	} else {
		r.mayDefer = canDefer
		res = s.routeSession(m.Context(), m, se, r)
	}
	if res.wait != nil {
		res.wait.handOver(w, m, se)
		return
	}
	if res.observe == obsRegister && s.observeHook != nil {
		s.observeHook(hookRouted)
	}
	s.answer(w, m, se, res)
}

// answer sets res as the answer to m.
func (s *Server) answer(w responseSetter, m *pool.Message, se *session, res response) {
	var opts []message.Option
	if res.maxAge > 0 {
		opts = append(opts, message.Option{ID: message.MaxAge, Value: encodeUint(res.maxAge)})
	}
	if res.size1 > 0 {
		opts = append(opts, message.Option{ID: message.Size1, Value: encodeUint(res.size1)})
	}
	var release func()
	switch res.observe {
	case obsRegister:
		seq, last, ok, rel := se.observe(s, m.Token(), res.topic)
		if rel == nil {
			if last, ok := s.hub.LastCommand(res.topic); ok {
				res.body = last.Payload
			}
			break
		}
		release = rel
		if s.observeHook != nil {
			s.observeHook(hookRegistered)
		}
		if ok {
			res.body = last.Payload
		}
		opts = append(opts, message.Option{ID: message.Observe, Value: encodeUint(seq)})
	case obsDeregister:
		se.unobserve(m.Token())
	}
	var body io.ReadSeeker
	if res.body != nil || res.code == codes.Content {
		body = bytes.NewReader(res.body)
	}
	if err := w.SetResponse(res.code, res.format, body, opts...); err != nil {
		s.log.Debug("coap: response not set", "device", se.device, "err", err)
	}
	if release != nil {
		afterAnswer(w, release)
	}
}

// Stages of an Observe registration at which tests' observeHook runs.
const (
	hookRouted     = iota // route decided, nothing registered yet
	hookRegistered        // registered, answer not yet written
)

// afterAnswer runs f once w's answer has been written: from otacache
// after it sent the answer (DTLSResponseWriter.AfterAnswer), or at once
// for a writer that has no such hook (tests' writers).
func afterAnswer(w responseSetter, f func()) {
	if aw, ok := w.(interface{ AfterAnswer(func()) }); ok {
		aw.AfterAnswer(f)
		return
	}
	f()
}

func encodeUint(v uint32) []byte {
	var b [4]byte
	n, _ := message.EncodeUint32(b[:], v) // 4 bytes always suffice
	return b[:n]
}

// observation is one Observe registration of a session (its token).
// Guarded by the session's mu.
type observation struct {
	tok    message.Token
	cancel func()
	// held: the registration answer has not been written yet; commands
	// for the token wait in queue (at most maxHeld) so that no
	// notification overtakes it.
	held  bool
	queue []bridges.Message
	gone  bool // deregistered, replaced or the session closed
}

// maxObservations bounds one session's observe registrations (distinct
// tokens). Each holds an observer in the hub for as long as the session
// lives, and a token is up to 8 bytes the device picks: without a bound
// one device could register until the gateway ran out of memory. A device
// observes its command topics, a handful.
const maxObservations = 16

// maxHeld bounds the commands held for one registration while its answer
// is being written (microseconds: the answer goes out right after the
// handler returns). Beyond it the oldest is dropped, logged.
const maxHeld = 16

// observe registers the token for commands on topic. The topic's last
// command (for the registration answer) is read atomically with the
// registration, and the answer's Observe number is taken in the same
// critical section (hub.ObserveLast), so a command delivered meanwhile is
// either in the answer or notified after it with a higher number. The
// token's notifications are held until release is called, once the
// answer is on the wire (afterAnswer).
//
// A new token past maxObservations is not registered (release is nil;
// counted and logged here, so that no resource can skip the bound): RFC
// 7641 §4.1 has a server unwilling to add an observer answer the GET
// without Observe, so the device sees it is not registered. A session's
// requests are handled one at a time, so the room seen here is still
// there when the token is added below.
func (se *session) observe(s *Server, token message.Token, topic string) (seq uint32, last bridges.Message, ok bool, release func()) {
	key := string(token)
	se.mu.Lock()
	_, again := se.obs[key]
	full := !again && len(se.obs) >= maxObservations
	se.mu.Unlock()
	if full {
		// A device stuck in a loop repeats this at the rate it can send.
		s.sessionLine(se, slog.LevelWarn, "observe_limit", "coap: observe not registered: the session observes as many tokens as it may; answered as a plain GET",
			"topic", ratelog.Clip(topic, ratelog.MaxText), "limit", maxObservations)
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonObserveLimit).Inc()
		return 0, bridges.Message{}, false, nil
	}
	o := &observation{tok: append(message.Token(nil), token...), held: true}
	cancel := s.hub.ObserveLast(se.device, topic, func(m bridges.Message) bool { return se.notify(s, o, m) }, func(l bridges.Message, found bool) {
		last, ok = l, found
		se.mu.Lock()
		se.seq++
		seq = se.seq & 0xffffff
		se.mu.Unlock()
	})
	release = func() { se.release(s, o) }
	se.mu.Lock()
	defer se.mu.Unlock()
	o.cancel = cancel
	if se.closed {
		o.gone = true
		cancel()
		return seq, last, ok, release
	}
	if se.obs == nil {
		se.obs = map[string]*observation{}
	}
	if old, found := se.obs[key]; found {
		old.gone = true
		old.cancel()
	}
	se.obs[key] = o
	return seq, last, ok, release
}

func (se *session) unobserve(token message.Token) {
	se.mu.Lock()
	defer se.mu.Unlock()
	if o, ok := se.obs[string(token)]; ok {
		o.gone = true
		o.cancel()
		delete(se.obs, string(token))
	}
}

// closeObservations ends every registration of a closed session.
func (se *session) closeObservations() {
	se.mu.Lock()
	defer se.mu.Unlock()
	for _, o := range se.obs {
		o.gone = true
		o.cancel()
	}
	se.obs, se.closed = nil, true
}

// release ends the hold on o's notifications (its registration answer
// was written) and sends what was held.
func (se *session) release(s *Server, o *observation) {
	se.mu.Lock()
	defer se.mu.Unlock()
	o.held = false
	q := o.queue
	o.queue = nil
	if o.gone || se.closed {
		return
	}
	for _, c := range q {
		se.send(s, o.tok, c)
	}
}

// maxNotifyPayload is the largest command sent as a notification: one
// datagram, the size of the Block2 blocks answers are cut into (otacache's
// default, 1024). A notification carrying only a first block (RFC 7959
// §2.6) would make the device GET the rest from the observed resource,
// which holds the last command of that exact topic, not of the topic below
// it that the command may be on, and may have changed between blocks.
const maxNotifyPayload = 1024

// notify sends a command as a non-confirmable notification (RFC 7641 §4.5
// allows it; a confirmable one would block the delivering goroutine until
// the device acknowledges). The device can GET the last command again.
// It runs under the hub's delivery lock (hub.Deliver), so notifications
// follow the order in which the last command changed. It reports whether
// the session took the command: a command larger than maxNotifyPayload is
// refused (counted reason="payload_too_large", logged); the device can
// still GET it from its exact topic, Block2 as any answer. Nor does it take
// one whose notification was not handed to the listener's socket (a write
// error, or dropped for want of room: send). One held behind a
// registration's answer counts as taken: it is sent once the answer is.
func (se *session) notify(s *Server, o *observation, c bridges.Message) bool {
	if len(c.Payload) > maxNotifyPayload {
		// One per command per observer, at the rate the cloud sends them.
		s.sessionLine(se, slog.LevelWarn, "notify_too_large", "coap: command not notified: larger than one notification; the device can GET it",
			"topic", ratelog.Clip(c.Topic, ratelog.MaxText), "size", len(c.Payload), "limit", maxNotifyPayload)
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonTooLarge).Inc()
		return false
	}
	se.mu.Lock()
	defer se.mu.Unlock()
	if o.gone || se.closed {
		return false
	}
	if o.held {
		if len(o.queue) >= maxHeld {
			s.sessionLine(se, slog.LevelWarn, "observe_backlog", "coap: command notification dropped: too many held behind an observe registration whose answer is being written; the device can GET the topic's last command",
				"topic", ratelog.Clip(o.queue[0].Topic, ratelog.MaxText), "limit", maxHeld)
			s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonObserveBacklog).Inc()
			o.queue = o.queue[1:]
		}
		o.queue = append(o.queue, c)
		return true
	}
	return se.send(s, o.tok, c)
}

// send numbers and writes one notification and reports whether it was
// handed to the listener's socket; se.mu is held, across both, so the
// Observe numbers on the wire never go backwards. The write is one UDP
// datagram and waits neither for the device nor for room in the
// listener's socket: one it has no room for is dropped, counted in
// Server.writeDropped and not as a command sent (notifyWrites), and since
// a notification is non-confirmable the device gets that command only at
// its next GET or registration.
func (se *session) send(s *Server, token message.Token, c bridges.Message) bool {
	se.seq++
	seq := se.seq & 0xffffff
	cc := se.cc
	m := pool.NewMessage(cc.Context())
	m.SetType(message.NonConfirmable)
	m.SetCode(codes.Content)
	m.SetToken(token)
	m.SetObserve(seq)
	m.SetContentFormat(notifyFormat(c.Topic))
	m.SetBody(bytes.NewReader(c.Payload))
	to := notifyAddr(cc.RemoteAddr())
	s.notifying.begin(to)
	err := cc.WriteMessage(m)
	dropped := s.notifying.end(to)
	switch {
	case err != nil:
		s.log.Debug("coap: command notification not sent", "device", se.device, "topic", c.Topic, "err", err)
		return false
	case dropped:
		// Logged (at most once per interval) and counted by writeDropped.
		s.log.Debug("coap: command notification dropped: the DTLS listener's socket has no room; the device gets the command at its next GET or registration",
			"device", se.device, "topic", c.Topic)
		return false
	}
	s.m.Messages.WithLabelValues(hub.CoAP, "command").Inc()
	return true
}

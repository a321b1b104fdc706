// Package upstream is Bastion's link to the cloud: an MQTT v5 client
// (paho.golang autopaho) over TLS 1.3 (1.2 if configured) with the gateway's
// client certificate, the broker verified against a configured CA bundle and
// server name. It drains the durable queue (bridges/queue) in order per
// device at QoS 1 and tells the queue to delete a message only after the
// broker's PUBACK; it maps topics both ways, applies the privacy forwarding
// rules, and refuses configurations that would loop.
//
// It never skips certificate verification, never deletes a message the
// broker did not acknowledge, and never forwards a topic the config does not
// name.
package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/rawconn"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki"
	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/prometheus/client_golang/prometheus"
)

// User properties on every uplink PUBLISH.
const (
	// OriginProperty carries the gateway id; a downlink message carrying
	// our own id is our own traffic coming back and is dropped.
	OriginProperty = "bastion-origin"
	// SeqProperty carries the queue sequence number so the cloud can drop
	// the duplicates that at-least-once delivery allows.
	SeqProperty = "bastion-seq"
)

// Source is the queue the link drains; *queue.Queue implements it.
type Source interface {
	bridges.Sink
	Next(ctx context.Context, after uint64, max int) ([]queue.Entry, error)
	Ack(seqs ...uint64) error
}

// Deliver hands a downlink command to the device transports. Its message
// is addressed to device m.Device on topic devices/{id}/c/....
type Deliver func(ctx context.Context, m bridges.Message) error

// Status is the link's state for bastionctl and the console.
type Status struct {
	Connected      bool      `json:"connected"`
	Broker         string    `json:"broker"`
	ServerName     string    `json:"server_name"`
	ConnectedSince time.Time `json:"connected_since,omitzero"`
	// LastError is the link's latest error; a connection coming up (its
	// CONNACK) clears it and keeps it as LastErrorBeforeConnect, so an
	// error shown next to connected: true happened on this connection.
	LastError              string    `json:"last_error,omitempty"`
	LastErrorAt            time.Time `json:"last_error_at,omitzero"`
	LastErrorBeforeConnect string    `json:"last_error_before_connect,omitempty"` // why the link was down before the current connection
	LastErrorBeforeAt      time.Time `json:"last_error_before_connect_at,omitzero"`
	Published              uint64    `json:"published"` // acknowledged by the broker
	Withheld               uint64    `json:"withheld"`  // kept local by privacy rules or mapping
	Downlink               uint64    `json:"downlink"`  // commands a device session received (not those kept for a device that is away)
	LoopsDropped           uint64    `json:"loops_dropped"`
	DownlinkSubscribed     bool      `json:"downlink_subscribed"`   // the broker granted every downlink subscription on this connection
	LastParked             string    `json:"last_parked,omitempty"` // why the broker refused the last parked message
	LastParkedAt           time.Time `json:"last_parked_at,omitzero"`
	ClientCertSubject      string    `json:"client_cert_subject"`
	ClientCertNotAfter     time.Time `json:"client_cert_not_after"`
	// ClientCertWarning says when the client certificate expires within
	// certWarnBefore, or has expired: renew it before the broker refuses
	// the link.
	ClientCertWarning string `json:"client_cert_warning,omitempty"`
}

// snapshot is one immutable configuration with its loaded credentials.
type snapshot struct {
	cfg    Config
	routes routes
	cert   *tls.Certificate
	roots  *x509.CertPool
	caPEM  []byte
	minTLS uint16
}

var _ bridges.NotifySink = (*Upstream)(nil)

// Upstream is the upstream link.
type Upstream struct {
	log     *slog.Logger
	q       Source
	deliver Deliver
	cur     atomic.Pointer[snapshot]
	parking atomic.Pointer[queue.Queue] // nil: refused messages stay queued
	m       *metrics

	mu sync.Mutex
	st Status
	// lines spaces the log lines of withheldQueued, redactFailed and
	// downlinkLine, one per message otherwise, to one a minute each.
	lines   *ratelog.Every
	restart context.CancelFunc
	parks   parkBucket

	// parkMu serializes parkEntry. parkedFrom maps the main queue's seq of
	// a parked message that the main queue still holds (its delete there
	// failed) to its seq in the parking queue (nil: to be read again from
	// the parking queue; parkedCopy).
	parkMu     sync.Mutex
	parkedFrom map[uint64]uint64
	// running is the sender's current run (nil between runs).
	running atomic.Pointer[sendRun]
	// roomMade counts RetryParked and DropParked calls that took messages
	// out of the parking queue. A run that fails to park reads it before
	// trying (sendRun.stall): room made after that is not missed.
	roomMade atomic.Uint64
	// stalls holds the devices whose oldest queued message the link can
	// neither send nor park (sendRun.stall): gate refuses their new
	// messages, which would only wait behind it and fill the queue.
	stalls stalledDevices

	// poison finds a message the broker answers by closing the connection
	// (poison.go); only the sender's goroutine touches it.
	poison poisonWatch

	// rulesSet (capacity 1) tells the sender that the privacy rules were
	// replaced (SetForward, a reload): a run that stopped at rules that
	// hold (ActionHold) starts again at once rather than after its pause,
	// up to backoff_max.
	rulesSet chan struct{}

	// writeTimeout, when set (tests), replaces writeTimeout(keepalive).
	writeTimeout time.Duration
}

// New checks cfg (Defaults, Validate), loads the certificate files and
// returns the link; Run connects. Metrics go to reg (nil: not exported).
func New(cfg Config, q Source, deliver Deliver, log *slog.Logger, reg prometheus.Registerer) (*Upstream, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s, err := load(cfg)
	if err != nil {
		return nil, err
	}
	u := &Upstream{log: log.With("component", "upstream"), q: q, deliver: deliver, lines: ratelog.New(time.Minute), rulesSet: make(chan struct{}, 1)}
	u.m = newMetrics()
	u.m.parkedDepth = prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "bastion_upstream_parked",
		Help: "Messages held in the parking queue (refused by the broker for good) until an operator retries or drops them."},
		func() float64 {
			if p := u.parking.Load(); p != nil {
				return float64(p.Stats().Depth)
			}
			return 0
		})
	if reg != nil {
		if err := u.m.register(reg); err != nil {
			return nil, fmt.Errorf("upstream: register metrics: %w", err)
		}
	}
	u.install(s)
	return u, nil
}

func load(cfg Config) (*snapshot, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rs, err := cfg.compile()
	if err != nil {
		return nil, err
	}
	s := &snapshot{cfg: cfg, routes: rs, minTLS: tls.VersionTLS13}
	if cfg.TLSMinVersion == "1.2" {
		s.minTLS = tls.VersionTLS12
	}
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("upstream.cert_file %s / upstream.key_file %s: load client certificate: %w", cfg.CertFile, cfg.KeyFile, err)
	}
	if cert.Leaf == nil || len(cert.Certificate) == 0 {
		return nil, fmt.Errorf("upstream.cert_file %s: no certificate", cfg.CertFile)
	}
	s.cert = &cert
	s.caPEM, err = os.ReadFile(cfg.CAFile)
	if err != nil {
		return nil, fmt.Errorf("upstream.ca_file %s: read broker CA bundle: %w", cfg.CAFile, err)
	}
	s.roots = x509.NewCertPool()
	if !s.roots.AppendCertsFromPEM(s.caPEM) {
		return nil, fmt.Errorf("upstream.ca_file %s: no PEM certificates found; it must hold the CA(s) that sign the broker's certificate", cfg.CAFile)
	}
	return s, nil
}

func (u *Upstream) install(s *snapshot) {
	if w := certWarning(s.cert.Leaf.NotAfter, time.Now()); w != "" {
		u.log.Warn("upstream: "+w, "cert_file", s.cfg.CertFile, "subject", s.cert.Leaf.Subject.String())
	}
	u.cur.Store(s)
	u.mu.Lock()
	u.st.Broker = s.cfg.Broker
	u.st.ServerName = s.cfg.ServerName
	u.st.ClientCertSubject = s.cert.Leaf.Subject.String()
	u.st.ClientCertNotAfter = s.cert.Leaf.NotAfter
	u.mu.Unlock()
	u.m.certExpiry.Set(float64(s.cert.Leaf.NotAfter.Unix()))
}

// Reload swaps in a new configuration and credentials (client certificate,
// CA bundle) without a restart. A bad config, unreadable files or a new
// client certificate that is not valid now (expired, or not yet valid)
// leave the running one in place and return why. When the connection
// parameters or credentials changed, the link reconnects so the new ones are
// used (and proven) at once; privacy rules and uplink mappings apply from
// the next message.
func (u *Upstream) Reload(cfg Config) error {
	r, err := u.PrepareReload(cfg)
	if err != nil {
		return err
	}
	r.Apply()
	return nil
}

// PreparedReload is a configuration PrepareReload loaded and checked, with
// its files read: Apply installs exactly that and cannot fail.
type PreparedReload struct {
	u    *Upstream
	s    *snapshot
	kept error
}

// PrepareReload does all of Reload that can fail, reading the files once
// and changing nothing: the gateway checks every part of a new
// configuration before it applies any, and a file that changes in between
// cannot make the second step fail. A refusal counts in
// bastion_upstream_reloads_total{result="refused"}, as Reload's does.
func (u *Upstream) PrepareReload(cfg Config) (*PreparedReload, error) {
	s, kept, err := u.loadReload(cfg)
	if err != nil {
		return nil, err
	}
	return &PreparedReload{u: u, s: s, kept: kept}, nil
}

// Apply installs the prepared configuration (see Reload).
func (r *PreparedReload) Apply() {
	u, s := r.u, r.s
	if r.kept != nil {
		u.log.Warn("upstream: the client certificate in use is not valid now; the reload keeps it, as it did not change it: install a certificate valid now (or check this box's clock), then reload", "err", r.kept)
	}
	old := u.cur.Load()
	u.install(s)
	u.m.reloads.WithLabelValues("ok").Inc()
	u.rulesReplaced()
	if needsReconnect(old, s) {
		u.log.Info("upstream configuration or credentials changed; reconnecting", "broker", s.cfg.Broker)
		u.mu.Lock()
		if u.restart != nil {
			u.restart()
		}
		u.mu.Unlock()
	}
}

// loadReload loads and checks cfg for Reload. A new client certificate
// that is not valid now is refused: installed, it would take a working link
// down (the broker refuses it). The certificate already in use is kept
// whatever its dates (kept says why it is not valid now): the reload does
// not make it any worse, and refusing the reload for it would refuse every
// change that comes with it (log level, pairing, firmware, rules) on a box
// whose certificate expired, or that has no real-time clock and is reloaded
// before NTP set the clock.
func (u *Upstream) loadReload(cfg Config) (_ *snapshot, kept, _ error) {
	s, err := load(cfg)
	if err == nil {
		err = certDates(s, time.Now())
		if err != nil && equalChain(u.cur.Load().cert.Certificate, s.cert.Certificate) {
			kept, err = err, nil
		}
	}
	if err != nil {
		u.m.reloads.WithLabelValues("refused").Inc()
		return nil, nil, fmt.Errorf("upstream reload refused, keeping the running configuration: %w", err)
	}
	return s, kept, nil
}

// certWarnBefore: the client certificate's coming expiry is reported
// (log, Status) this long before.
const certWarnBefore = 7 * 24 * time.Hour

// certWarning says when a client certificate valid until notAfter expires
// soon or has expired ("" when neither).
func certWarning(notAfter, now time.Time) string {
	switch left := notAfter.Sub(now); {
	case notAfter.IsZero() || left >= certWarnBefore:
		return ""
	case left <= 0:
		return fmt.Sprintf("the client certificate (upstream.cert_file) expired at %s: the broker refuses the link until a renewed certificate is installed (then SIGHUP)", notAfter.UTC().Format(time.RFC3339))
	default:
		return fmt.Sprintf("the client certificate (upstream.cert_file) expires in %s, at %s: install a renewed certificate (then SIGHUP) before the broker refuses the link", left.Round(time.Hour), notAfter.UTC().Format(time.RFC3339))
	}
}

// certDates refuses a client certificate that is not valid now: installed,
// it would take a working link down (the broker refuses it).
func certDates(s *snapshot, now time.Time) error {
	leaf := s.cert.Leaf
	switch {
	case now.After(leaf.NotAfter):
		return fmt.Errorf("upstream.cert_file %s: the client certificate %q expired at %s (now %s); the broker would refuse it: install a renewed certificate and reload",
			s.cfg.CertFile, leaf.Subject.String(), leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("upstream.cert_file %s: the client certificate %q is valid only from %s (now %s); the broker would refuse it: check this box's clock, or install a certificate valid now, and reload",
			s.cfg.CertFile, leaf.Subject.String(), leaf.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return nil
}

// SetForward replaces the privacy rules alone, from the next message on,
// keeping the running connection and credentials. Unlike Reload it reads no
// file: a rule change (from the console) must take effect even while the
// certificate files are being rotated or are unreadable, since the change
// may be the operator keeping a topic local. Rules that do not validate
// leave the running ones in place and return why.
func (u *Upstream) SetForward(rules []Rule) error {
	if err := errors.Join(validateRules(rules)...); err != nil {
		return fmt.Errorf("upstream forwarding rules refused, keeping the running ones: %w", err)
	}
	rules = slices.Clone(rules)
	for {
		old := u.cur.Load()
		s := *old
		s.cfg.Forward = rules
		if u.cur.CompareAndSwap(old, &s) {
			break
		}
	}
	u.log.Info("upstream forwarding rules replaced", "rules", len(rules))
	u.rulesReplaced()
	return nil
}

// rulesReplaced wakes a sender that is pausing after a failed run (any
// failure: a run that a broker's refusal ended is only tried once more):
// if the run stopped at rules that hold, the new rules may let its
// messages go (or keep them local). Without it, sending resumed only after
// the pause, which grows to backoff_max (2 minutes by default) while the
// rules hold.
func (u *Upstream) rulesReplaced() {
	select {
	case u.rulesSet <- struct{}{}:
	default:
	}
}

func needsReconnect(a, b *snapshot) bool {
	ac, bc := a.cfg, b.cfg
	ac.Forward, bc.Forward, ac.Uplink, bc.Uplink = nil, nil, nil, nil
	if fmt.Sprint(ac) != fmt.Sprint(bc) {
		return true
	}
	return string(a.caPEM) != string(b.caPEM) || !equalChain(a.cert.Certificate, b.cert.Certificate)
}

func equalChain(a, b [][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if string(a[i]) != string(b[i]) {
			return false
		}
	}
	return true
}

// Status returns a snapshot of the link's state.
func (u *Upstream) Status() Status {
	u.mu.Lock()
	st := u.st
	u.mu.Unlock()
	st.ClientCertWarning = certWarning(st.ClientCertNotAfter, time.Now())
	return st
}

// Accept is the privacy gate in front of the queue (a bridges.Sink): a
// message the rules keep local, or no uplink maps, is withheld (and
// counted) without touching the disk; a redact rule strips fields before the
// message is stored. A message whose upstream topic is beyond the topic
// limits is refused (bridges.ErrTopicRefused), and so is one from a device
// whose oldest queued message can be neither sent nor parked
// (bridges.ErrQueueFull; see stalledDevices). Everything else goes to the
// queue. The rules are applied
// again when sending, so a rule tightened by Reload also covers messages
// already queued.
func (u *Upstream) Accept(ctx context.Context, m bridges.Message) error {
	m, keep, err := u.gate(m)
	if err != nil || !keep {
		return err
	}
	return u.q.Accept(ctx, m)
}

// AcceptAsync is the same privacy gate in front of the queue's AcceptAsync
// (bridges.AsyncSink): the rules decide at once, a withheld message needs no
// wait (nil channel), and a stored one is durable when the channel says so.
// A queue without AcceptAsync is waited for here.
func (u *Upstream) AcceptAsync(ctx context.Context, m bridges.Message) (<-chan error, error) {
	m, keep, err := u.gate(m)
	if err != nil || !keep {
		return nil, err
	}
	if as, ok := u.q.(bridges.AsyncSink); ok {
		return as.AcceptAsync(ctx, m)
	}
	return nil, u.q.Accept(ctx, m)
}

// AcceptNotify is the same privacy gate in front of the queue's
// AcceptNotify (bridges.NotifySink).
func (u *Upstream) AcceptNotify(ctx context.Context, m bridges.Message, done func(error)) (pending bool, err error) {
	m, keep, err := u.gate(m)
	if err != nil || !keep {
		return false, err
	}
	return bridges.AcceptNotify(ctx, u.q, m, done)
}

// gate applies the mapping and the privacy rules: keep is false for a
// message that stays local (counted as withheld). A message it would queue
// whose upstream topic is beyond upstream.max_topic_length or
// max_topic_levels is refused (bridges.ErrTopicRefused), nothing stored:
// the verdict is the configuration's, known now, and the link would only
// park it unsent (or, with the parking queue full, hold its device's
// messages behind it), its device told it was accepted. While the rules
// hold (ActionHold) a message no local rule withholds is refused
// (bridges.ErrQueueFull), nothing stored: its device keeps it.
func (u *Upstream) gate(m bridges.Message) (_ bridges.Message, keep bool, _ error) {
	if !strings.HasPrefix(m.Topic, bridges.TopicPrefix(m.Device)) {
		return m, false, fmt.Errorf("upstream accept: topic %q is outside device %q's namespace %s", m.Topic, m.Device, bridges.TopicPrefix(m.Device))
	}
	s := u.cur.Load()
	length, levels, ok := s.routes.upShape(m.Device, m.Topic)
	if !ok {
		u.withheld("unmapped")
		return m, false, nil
	}
	v, payload, reason, err := applyRules(s.cfg.Forward, m.Topic, m.Payload)
	switch v {
	case withhold:
		u.withheld(reason)
		if err != nil {
			u.redactFailed(m, reason, err)
		}
		return m, false, nil
	case hold:
		// Refused, not withheld: whether it may leave is not known now,
		// and its device keeps it and sends it again.
		u.m.refused.WithLabelValues(reason).Inc()
		u.lines.Line(u.log, slog.LevelError, "rules_held", "upstream: messages refused to their devices: the privacy forwarding rules cannot be read, so nothing is sent or deleted until they can be (bastion_upstream_refused_total{reason=\"rules_unreadable\"})",
			"device", m.Device, "topic", m.Topic)
		return m, false, fmt.Errorf("upstream accept from %s: the privacy forwarding rules cannot be read, so whether the message may leave the box is not known; refused until they can be read: %w", m.Device, bridges.ErrQueueFull)
	}
	if s.cfg.beyondTopicLimits(length, levels) {
		up, _ := s.routes.mapUp(m.Device, m.Topic)
		why, label := s.cfg.topicLimit(up, m.Device)
		u.m.refused.WithLabelValues(label).Inc()
		return m, false, fmt.Errorf("upstream accept from %s on %s: %s: %w", m.Device, m.Topic, why, bridges.ErrTopicRefused)
	}
	if u.stalls.has(m.Device) {
		u.m.refused.WithLabelValues("device_stalled").Inc()
		return m, false, fmt.Errorf("upstream accept from %s: its oldest queued message can be neither sent nor parked (see the link's last error), and its later messages wait behind it; new ones are refused until it moves: %w", m.Device, bridges.ErrQueueFull)
	}
	m.Payload = payload
	return m, true, nil
}

// redactFailed says, at most once a minute, that a redact rule kept a
// message local because its payload could not be redacted: unlike a local
// rule, that is not what the operator asked for, and only the payload shows
// whether the rule or the device is wrong.
func (u *Upstream) redactFailed(m bridges.Message, reason string, err error) {
	u.lines.Line(u.log, slog.LevelWarn, "redact_refused", "upstream: a message under a redact rule kept local: its payload cannot be redacted (bastion_upstream_withheld_total{reason})",
		"device", m.Device, "topic", m.Topic, "reason", reason, "err", err)
}

func (u *Upstream) withheld(reason string) {
	u.m.withheld.WithLabelValues(reason).Inc()
	u.mu.Lock()
	u.st.Withheld++
	u.mu.Unlock()
}

// upShape returns the length and the number of levels of the topic mapUp
// would build, without building it; ok is false when no uplink maps topic.
func (rs routes) upShape(device, topic string) (length, levels int, ok bool) {
	for _, r := range rs.up {
		if id, rest, ok := r.from.match(topic); ok && id == device {
			t := r.to
			return len(t.pre) + len(id) + len(t.post) + len(rest),
				strings.Count(t.pre, "/") + strings.Count(t.post, "/") + strings.Count(rest, "/") + 1, true
		}
	}
	return 0, 0, false
}

func (rs routes) mapUp(device, topic string) (string, bool) {
	for _, r := range rs.up {
		if id, rest, ok := r.from.match(topic); ok && id == device {
			return r.to.render(id, rest), true
		}
	}
	return "", false
}

// Run keeps the link up until ctx ends. It returns nil on shutdown.
func (u *Upstream) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		gen, cancel := context.WithCancel(ctx)
		u.mu.Lock()
		u.restart = cancel
		u.mu.Unlock()
		err := u.generation(gen, u.cur.Load())
		cancel()
		if err != nil && ctx.Err() == nil {
			return err
		}
	}
	return nil
}

// generation is one connection manager with one configuration; Reload
// ends it to start the next.
func (u *Upstream) generation(ctx context.Context, s *snapshot) error {
	broker, err := url.Parse(s.cfg.Broker)
	if err != nil {
		return fmt.Errorf("upstream.broker %q: %w", s.cfg.Broker, err)
	}
	var (
		wg    sync.WaitGroup
		ups   = make(chan chan struct{}, 1)
		downM sync.Mutex
		down  chan struct{}
	)
	sess := newLinkSession()
	bo := newBackoff(s.cfg.BackoffMin, s.cfg.BackoffMax)
	cc := autopaho.ClientConfig{
		ServerUrls: []*url.URL{broker},
		KeepAlive:  uint16(s.cfg.KeepAlive / time.Second),
		// Every connection starts clean and the session ends with it: the
		// durable queue, not a broker session, decides what is resent.
		CleanStartOnInitialConnection: true,
		SessionExpiryInterval:         0,
		ConnectTimeout:                s.cfg.ConnectTimeout,
		ReconnectBackoff:              bo.delay,
		AttemptConnection:             u.dial,
		ConnectPacketBuilder: func(cp *paho.Connect, _ *url.URL) (*paho.Connect, error) {
			cp.CleanStart = true
			if cp.Properties == nil {
				cp.Properties = &paho.ConnectProperties{}
			}
			limit := uint32(maxDownlinkPacket)
			cp.Properties.MaximumPacketSize = &limit
			recvMax := uint16(downlinkReceiveMaximum)
			cp.Properties.ReceiveMaximum = &recvMax
			return cp, nil
		},
		OnConnectionUp: func(cm *autopaho.ConnectionManager, ca *paho.Connack) {
			u.log.Info("upstream connected", "broker", s.cfg.Broker)
			if w := certWarning(u.cur.Load().cert.Leaf.NotAfter, time.Now()); w != "" {
				u.log.Warn("upstream: "+w, "cert_file", s.cfg.CertFile)
			}
			bo.up()
			u.setConnected(true)
			d := make(chan struct{})
			downM.Lock()
			down = d
			downM.Unlock()
			select {
			case <-ups:
			default:
			}
			ups <- d
			wg.Add(1)
			go func() {
				defer wg.Done()
				u.subscribeDownlink(ctx, cm, s, d)
			}()
		},
		OnConnectionDown: func() bool {
			bo.down()
			// down closes first: subscribeDownlink marks the downlink
			// subscribed only while it is open, and setConnected clears it.
			downM.Lock()
			if down != nil {
				close(down)
				down = nil
			}
			downM.Unlock()
			u.setConnected(false)
			return true
		},
		OnConnectError: func(err error) {
			u.m.connectErrors.Inc()
			u.countRefusedRead(err)
			u.setError(explain(err, u.cur.Load()))
		},
		ClientConfig: paho.ClientConfig{
			ClientID: s.cfg.ClientID,
			Session:  sess,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){
				func(pr paho.PublishReceived) (bool, error) {
					u.downlink(ctx, pr.Packet)
					return true, nil
				},
			},
			OnClientError: func(err error) {
				u.countRefusedRead(err)
				u.setError(fmt.Errorf("upstream connection to %s lost: %w", s.cfg.Broker, err))
			},
			OnServerDisconnect: func(d *paho.Disconnect) {
				u.setError(fmt.Errorf("upstream broker %s sent DISCONNECT with reason 0x%02x %s", s.cfg.Broker, d.ReasonCode, reasonString(d.Properties)))
			},
		},
	}
	cm, err := autopaho.NewConnection(ctx, cc)
	if err != nil {
		return fmt.Errorf("upstream connect to %s: %w", s.cfg.Broker, err)
	}
	u.sendLoop(ctx, sess, ups, s)
	<-cm.Done()
	wg.Wait()
	u.setConnected(false)
	return nil
}

func reasonString(p *paho.DisconnectProperties) string {
	if p == nil {
		return ""
	}
	return p.ReasonString
}

// dial opens the TLS connection with the credentials current at dial time,
// so a rotated certificate or CA bundle is used on the next attempt.
func (u *Upstream) dial(ctx context.Context, _ autopaho.ClientConfig, broker *url.URL) (net.Conn, error) {
	s := u.cur.Load()
	// The outbound profile: ECDHE with AEAD suites only, also with TLS 1.2.
	tc := pki.TLSClient(s.roots, s.cfg.ServerName, s.minTLS == tls.VersionTLS12)
	tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		return u.cur.Load().cert, nil
	}
	if tc.ServerName == "" { // as tls.Dialer does
		tc.ServerName = broker.Hostname()
	}
	dctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, "tcp", broker.Host)
	if err != nil {
		return nil, explain(err, s)
	}
	// The TLS connection runs on rawconn: the link's reads and writes
	// (one of each per group commit, about) then never wake the runtime's
	// sysmon thread, which polls every 20 µs for a millisecond after each
	// system call through the runtime's entry that finds it asleep.
	conn := tls.Client(rawconn.Wrap(raw), tc)
	if err := conn.HandshakeContext(dctx); err != nil {
		raw.Close()
		return nil, explain(err, s)
	}
	pc := &packetConn{Conn: conn, writeTimeout: writeTimeout(s.cfg.KeepAlive)}
	if u.writeTimeout > 0 {
		pc.writeTimeout = u.writeTimeout
	}
	// ctx ends at shutdown and reload: a write blocked on a broker that
	// stopped reading would hold them up to writeTimeout, and the
	// DISCONNECT behind it.
	pc.stopAbort = context.AfterFunc(ctx, func() { pc.abortWrites(shutdownGrace) })
	return pc, nil
}

// explained is an error explain already annotated.
type explained struct{ error }

func (e explained) Unwrap() error { return e.error }

// explain turns TLS failures into errors naming the config key to fix.
func explain(err error, s *snapshot) error {
	var done explained
	if errors.As(err, &done) {
		return done // drop the wrapping autopaho added around our dial error
	}
	return explained{explain1(err, s)}
}

func explain1(err error, s *snapshot) error {
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("upstream %s: broker certificate is not signed by a CA in upstream.ca_file %s; refusing to connect: %w", s.cfg.Broker, s.cfg.CAFile, err)
	case errors.As(err, &he):
		return fmt.Errorf("upstream %s: broker certificate is not valid for upstream.server_name %q; refusing to connect: %w", s.cfg.Broker, s.cfg.ServerName, err)
	case errors.As(err, &ci):
		return fmt.Errorf("upstream %s: broker certificate invalid (check the clock and the certificate's dates); refusing to connect: %w", s.cfg.Broker, err)
	case noCommonTLSVersion(err) && s.minTLS == tls.VersionTLS13:
		return fmt.Errorf("upstream %s: the broker does not speak TLS 1.3, which upstream.tls_min_version %q requires; if it can only do TLS 1.2, set upstream.tls_min_version = \"1.2\"; refusing to connect: %w", s.cfg.Broker, s.cfg.TLSMinVersion, err)
	case noCommonTLSVersion(err):
		return fmt.Errorf("upstream %s: the broker speaks neither TLS 1.3 nor 1.2 (upstream.tls_min_version %q is the lowest the link uses); upgrade the broker's TLS; refusing to connect: %w", s.cfg.Broker, s.cfg.TLSMinVersion, err)
	case strings.Contains(err.Error(), "remote error: tls:"):
		return fmt.Errorf("upstream %s: broker refused the TLS handshake, likely our client certificate (upstream.cert_file %s), the TLS version (upstream.tls_min_version %s) or no cipher suite in common (the link offers only ECDHE with AES-GCM or ChaCha20-Poly1305; enable one on the broker): %w", s.cfg.Broker, s.cfg.CertFile, s.cfg.TLSMinVersion, err)
	}
	return fmt.Errorf("upstream %s: %w", s.cfg.Broker, err)
}

// noCommonTLSVersion reports a handshake that failed because the broker
// offers no TLS version the link accepts: the broker's protocol_version
// alert, or (a broker that ignores the versions we offered) our own refusal
// of the version it chose. crypto/tls has no exported type for either.
func noCommonTLSVersion(err error) bool {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" && oe.Err != nil && oe.Err.Error() == "tls: protocol version not supported" {
		return true
	}
	return strings.Contains(err.Error(), "tls: server selected unsupported protocol version")
}

func (u *Upstream) setConnected(up bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if up && !u.st.Connected {
		u.st.ConnectedSince = time.Now()
		// The errors so far are why the link was down: kept apart, so
		// that last_error beside connected: true is about this connection.
		if u.st.LastError != "" {
			u.st.LastErrorBeforeConnect, u.st.LastErrorBeforeAt = u.st.LastError, u.st.LastErrorAt
			u.st.LastError, u.st.LastErrorAt = "", time.Time{}
		}
	}
	if !up {
		u.st.ConnectedSince = time.Time{}
	}
	u.st.Connected = up
	if up {
		u.m.connected.Set(1)
	} else {
		u.m.connected.Set(0)
		u.st.DownlinkSubscribed = false
		u.m.downlinkSubscribed.Set(0)
	}
}

// setSubscribed records that every downlink subscription of the connection
// that down belongs to is granted, unless that connection is gone already.
func (u *Upstream) setSubscribed(down <-chan struct{}) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if closed(down) {
		return
	}
	u.st.DownlinkSubscribed = true
	u.m.downlinkSubscribed.Set(1)
}

func (u *Upstream) setError(err error) {
	u.log.Warn("upstream link", "err", err)
	u.mu.Lock()
	u.st.LastError = err.Error()
	u.st.LastErrorAt = time.Now()
	u.mu.Unlock()
}

// subscribeDownlink subscribes to the downlink filters on the connection
// that down belongs to. Until the broker grants them the devices' commands
// are lost (the session is clean: nothing is kept for the link), so what
// the broker refuses or does not answer is asked again, with growing
// pauses, for as long as the connection stays up; waiting for a reconnect
// that a healthy connection never needs would lose them for good.
func (u *Upstream) subscribeDownlink(ctx context.Context, cm *autopaho.ConnectionManager, s *snapshot, down <-chan struct{}) {
	var subs []paho.SubscribeOptions
	for _, r := range s.routes.down {
		// NoLocal: the broker never sends us our own publications.
		// RetainHandling 2: nor the retained messages it holds when we
		// subscribe. Every connection subscribes anew (clean session), so
		// a retained command (reboot, unlock) would be carried out again
		// after each reconnect or reload; a command is for when it is sent.
		subs = append(subs, paho.SubscribeOptions{Topic: r.from.filter(), QoS: 1, NoLocal: true, RetainHandling: 2})
	}
	var pause time.Duration
	for len(subs) > 0 {
		var err error
		if subs, err = u.subscribe(ctx, cm, s, subs); err == nil {
			break
		}
		// A connection that ended under the SUBSCRIBE is reported by its
		// own end (the broker's DISCONNECT reason, or what broke it);
		// "no SUBACK" would replace that in Status with a consequence.
		if closed(down) || ctx.Err() != nil || errors.Is(err, paho.ErrConnectionLost) || errors.Is(err, session.ErrNoConnection) {
			return
		}
		u.m.subscribeErrors.Inc()
		pause = min(max(2*pause, s.cfg.BackoffMin), s.cfg.BackoffMax)
		u.setError(fmt.Errorf("%w; downlink commands are lost until it is granted: asking again in %s", err, pause.Round(time.Millisecond)))
		select {
		case <-time.After(pause):
		case <-down:
			return
		case <-ctx.Done():
			return
		}
	}
	u.setSubscribed(down)
}

// subscribe sends one SUBSCRIBE for subs and returns the ones not granted,
// with why.
func (u *Upstream) subscribe(ctx context.Context, cm *autopaho.ConnectionManager, s *snapshot, subs []paho.SubscribeOptions) ([]paho.SubscribeOptions, error) {
	sa, err := cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	if sa == nil { // paho returns the SUBACK with the error of a refusal
		return subs, fmt.Errorf("upstream broker %s: downlink subscription to %s got no SUBACK: %w", s.cfg.Broker, topics(subs), err)
	}
	var (
		refused []paho.SubscribeOptions
		errs    []error
	)
	for i, sub := range subs {
		rc := byte(0x80)
		if i < len(sa.Reasons) {
			rc = sa.Reasons[i]
		}
		if rc >= 0x80 {
			refused = append(refused, sub)
			errs = append(errs, fmt.Errorf("upstream broker %s refused the downlink subscription %q with SUBACK reason 0x%02x: %s", s.cfg.Broker, sub.Topic, rc, subackAdvice(rc)))
		}
	}
	return refused, errors.Join(errs...)
}

func topics(subs []paho.SubscribeOptions) string {
	ts := make([]string, len(subs))
	for i, s := range subs {
		ts[i] = s.Topic
	}
	return strings.Join(ts, ", ")
}

// subackAdvice says what a SUBACK failure reason means for the operator.
func subackAdvice(rc byte) string {
	switch rc {
	case packets.SubackNotauthorized:
		return "not authorized; allow this gateway's client (its certificate's identity) to subscribe to it in the broker's ACL"
	case packets.SubackTopicFilterinvalid:
		return "topic filter invalid; check upstream.downlink, upstream.prefix and upstream.gateway"
	case packets.SubackWildcardsubscriptionsnotsupported:
		return "the broker does not allow wildcard subscriptions, which the downlink mapping ({id} as +) needs; enable them on the broker"
	case packets.SubackQuotaexceeded:
		return "quota exceeded; raise this client's subscription limit on the broker"
	}
	return "the broker's own failure; see the broker's log"
}

// downlink maps a command from the broker to a device.
func (u *Upstream) downlink(ctx context.Context, p *paho.Publish) {
	s := u.cur.Load()
	if p.Properties != nil {
		for _, up := range p.Properties.User {
			if up.Key == OriginProperty && up.Value == s.cfg.Gateway {
				u.m.downlink.WithLabelValues("loop").Inc()
				u.mu.Lock()
				u.st.LoopsDropped++
				u.mu.Unlock()
				return
			}
		}
	}
	for _, r := range s.routes.down {
		id, rest, ok := r.from.match(p.Topic)
		if !ok {
			continue
		}
		if p.Retain {
			// Only a message replayed from the broker's store at subscribe
			// time carries the flag (no Retain As Published); a broker that
			// ignores RetainHandling 2 still does not get it executed again.
			u.m.downlink.WithLabelValues("retained").Inc()
			u.downlinkLine(slog.LevelInfo, "retained", "downlink command dropped: a retained message replayed by the broker, not a command sent now", id, p.Topic)
			return
		}
		m := bridges.Message{Device: id, Topic: r.to.render(id, rest), Payload: p.Payload, QoS: min(p.QoS, 1), Received: time.Now()}
		if err := u.deliver(ctx, m); errors.Is(err, bridges.ErrNoReceiver) {
			// Taken and kept for the device's next GET or Observe, but no
			// session of the device received it: not "delivered".
			u.m.downlink.WithLabelValues("no_receiver").Inc()
			u.downlinkLine(slog.LevelInfo, "no_receiver", "downlink command kept: no device session receives it now", id, m.Topic)
			return
		} else if err != nil {
			result := downlinkResult(err)
			u.m.downlink.WithLabelValues(result).Inc()
			u.downlinkLine(slog.LevelWarn, result, "downlink command not delivered", id, m.Topic, "err", ratelog.ClipErr(err))
			return
		}
		u.m.downlink.WithLabelValues("delivered").Inc()
		u.mu.Lock()
		u.st.Downlink++
		u.mu.Unlock()
		return
	}
	u.m.downlink.WithLabelValues("unmapped").Inc()
}

// sendLoop runs the pipeline on each connection. After a failure while the
// connection stays up (a broker refusing a message) it waits with growing
// pauses instead of spinning; the message stays in the queue.
func (u *Upstream) sendLoop(ctx context.Context, ls *linkSession, ups <-chan chan struct{}, s *snapshot) {
	var (
		down chan struct{}
		last *sendRun // the last run on down's connection
	)
	pause := time.Duration(0)
	for ctx.Err() == nil {
		if down == nil || closed(down) {
			if last != nil {
				u.connectionEnded(last)
				last = nil
			}
			select {
			case down = <-ups:
				pause = 0
			case <-ctx.Done():
				return
			}
		}
		if pause > 0 {
			select {
			case <-time.After(pause):
			case <-u.rulesSet:
			case <-down:
				continue
			case <-ctx.Done():
				return
			}
		}
		// The run reads the rules in force from here: a replacement before
		// it is no reason to skip the pause after it.
		select {
		case <-u.rulesSet:
		default:
		}
		r := u.pipeline(ctx, ls, down, s)
		if r != nil {
			last = r
		}
		if r != nil && r.failed.Load() {
			pause = min(max(2*pause, s.cfg.BackoffMin), s.cfg.BackoffMax)
		} else {
			pause = 0
		}
	}
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// pipeline sends the queue from its head until the connection drops or a
// publish fails, and returns the run (nil if the connection was gone
// already), whose failed says whether it ended on a failure other than the
// connection going down. It is the only writer of PUBLISH packets: it
// writes them in queue order (so order per device is kept), every PUBLISH
// that is ready at once in one write (one TLS record), with up to Window
// (and the broker's Receive Maximum) awaiting their PUBACK. The PUBACKs
// complete on paho's receive goroutine (linkSession, sendRun.puback).
func (u *Upstream) pipeline(ctx context.Context, ls *linkSession, down <-chan struct{}, s *snapshot) *sendRun {
	gen, maxQoS, maxPacket := ls.connection()
	if gen == 0 { // already gone; the next connection brings a new down
		select {
		case <-down:
		case <-ctx.Done():
		}
		return nil
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-down:
			cancel()
		case <-pctx.Done():
		}
	}()
	r := &sendRun{u: u, cancel: cancel, conn: ls.connEnd(gen), retryAfter: s.cfg.BackoffMax}
	u.running.Store(r)
	defer u.running.CompareAndSwap(r, nil)
	// The queue's NextInto reuses the entries and the read buffer of the
	// previous batch: nothing of a batch is kept once its PUBLISHes are in
	// buf (appendPublish copies the payload; park copies the message).
	next := func(ctx context.Context, after uint64, max int, _ []queue.Entry, _ []byte) ([]queue.Entry, []byte, error) {
		es, err := u.q.Next(ctx, after, max)
		return es, nil, err
	}
	if qi, ok := u.q.(interface {
		NextInto(context.Context, uint64, int, []queue.Entry, []byte) ([]queue.Entry, []byte, error)
	}); ok {
		next = qi.NextInto
	}
	var (
		es      []queue.Entry
		readBuf []byte
		mapped  mappedTopics // this run's upstream topics, per device and topic
		cursor  uint64
		buf     []byte
		qos0    []uint64 // sent at QoS 0 in buf: acked once written
		// The last QoS 1 PUBLISH in buf, for r.written once it is.
		lastSeq    uint64
		lastDev    string
		lastSingle bool
		// Devices with a message this run can neither send nor park: the
		// rest of theirs stays queued behind it (order per device).
		stalled map[string]bool
	)
	flush := func() bool {
		if len(buf) == 0 {
			return true
		}
		n, err := ls.write(gen, buf)
		buf = buf[:0]
		if err != nil {
			if !errors.Is(err, errNoConnection) && pctx.Err() == nil {
				r.fail(fmt.Errorf("upstream: write to %s: %w", s.cfg.Broker, err))
			}
			cancel()
			return false
		}
		if lastSeq != 0 {
			r.written, r.writtenDev, r.single, r.writtenAt, r.writtenWrite = lastSeq, lastDev, lastSingle, time.Now(), n
			lastSeq = 0
		}
		if len(qos0) > 0 {
			if err := u.q.Ack(qos0...); err != nil {
				r.fail(fmt.Errorf("upstream: ack QoS 0 seqs %d..%d in the queue: %w", qos0[0], qos0[len(qos0)-1], err))
				return false
			}
			u.delivered(len(qos0))
			qos0 = qos0[:0]
		}
		return true
	}
feed:
	for {
		var err error
		es, readBuf, err = next(pctx, cursor, 64, es, readBuf)
		if err != nil {
			if pctx.Err() == nil {
				r.fail(fmt.Errorf("upstream: reading the queue: %w", err))
			}
			break
		}
		if cursor == 0 && len(es) > 0 {
			r.conn.forgetBelow(es[0].Seq)
		}
		for _, e := range es {
			cursor = e.Seq
			if stalled[e.Device] || r.holds(e.Device) {
				// Stays queued, behind its device's message that could
				// not be sent, parked, or was refused.
				continue
			}
			topic, payload, keep, err := u.prepare(e, &mapped)
			if err != nil {
				r.fail(err)
				break feed
			}
			if !keep {
				continue // withheld and acked
			}
			// The link's own verdicts (a topic beyond the configured limits,
			// which gate refuses for new messages, so here only for one
			// queued before a reload lowered them; a packet beyond the
			// broker's announced Maximum Packet Size) park the message
			// unsent: a broker that enforces them by closing
			// the connection would get it again on every reconnect. When it
			// cannot be parked (no parking queue, or the parking queue is
			// full) it stays queued, unsent, and so does the rest of its
			// device's messages (order per device); the other devices'
			// messages flow.
			if why, label := s.cfg.topicLimit(topic, e.Device); why != "" {
				room := u.roomMade.Load()
				if err := u.parkUnsendable(e, label, why); err != nil {
					stalled = r.stall(stalled, e, room, fmt.Errorf("upstream broker %s: seq %d from %s: %s; it cannot be parked: %w", s.cfg.Broker, e.Seq, e.Device, why, err))
				}
				continue
			}
			qos := min(e.QoS, 1)
			if n := publishLen(qos, topic, payload, s.cfg.Gateway, e.Seq); maxPacket > 0 && n > maxPacket {
				why := fmt.Sprintf("the PUBLISH would be larger than the broker's Maximum Packet Size of %d bytes", maxPacket)
				room := u.roomMade.Load()
				if err := u.parkUnsendable(e, reasonName(0x95), why); err != nil {
					stalled = r.stall(stalled, e, room, fmt.Errorf("upstream broker %s: seq %d from %s: %s, and it cannot be parked: %w; raise the broker's maximum packet size (Mosquitto: max_packet_size) to at least %d bytes",
						s.cfg.Broker, e.Seq, e.Device, why, err, n))
				}
				continue
			}
			if qos > maxQoS {
				r.fail(fmt.Errorf("upstream broker %s grants at most QoS %d (CONNACK Maximum QoS), and the link sends at QoS 1 so that a message leaves the queue only after the broker's PUBACK; seq %d from %s and every message behind it stay queued until the broker allows QoS 1 for this gateway (Mosquitto: max_qos 1 or more)",
					s.cfg.Broker, maxQoS, e.Seq, e.Device))
				break feed
			}
			var (
				id       uint16
				inFlight int
			)
			for qos > 0 {
				var full bool
				id, inFlight, full, err = ls.addPublish(gen, u.poison.window(r, s.cfg.Window), r, e.Seq, e.Device)
				if err != nil {
					if !errors.Is(err, errNoConnection) {
						r.fail(fmt.Errorf("upstream publish seq %d: %w", e.Seq, err))
					}
					break feed
				}
				if !full {
					break
				}
				// The window is full: send what is gathered, wait for a PUBACK.
				if !flush() {
					break feed
				}
				select {
				case <-ls.room:
				case <-pctx.Done():
					break feed
				}
			}
			buf = appendPublish(buf, id, qos, topic, payload, s.cfg.Gateway, e.Seq)
			if qos == 0 {
				qos0 = append(qos0, e.Seq)
			} else {
				// Alone: the only PUBLISH awaiting a PUBACK, whether the slow
				// start's window or the broker's Receive Maximum made it so.
				lastSeq, lastDev, lastSingle = e.Seq, e.Device, inFlight == 1
			}
		}
		// A device an earlier run stalled on a message up to cursor that
		// this run sent, parked or withheld (or no longer found: the queue
		// dropped it as unreadable) is stalled no more.
		u.stalls.passed(r, cursor)
		if !flush() {
			break
		}
	}
	// A message that cannot be sent ends the run (it stays queued), but the
	// PUBLISHes gathered before it hold packet identifiers of this
	// connection and come before it in the queue: they go out, and their
	// PUBACKs free those identifiers. Dropped with the run, they were never
	// sent while the same message failed every retry, and each retry took
	// more of the window until the link stalled.
	flush()
	cancel()
	wg.Wait()
	r.endRetry()
	if r.again.Load() && !r.failed.Load() {
		// Ended to start again from the queue's head (sendRun.stall), on
		// a connection that is still up: what is in flight is answered
		// first, rather than sent again.
		for deadline := time.Now().Add(10 * time.Second); ls.inFlight(gen) > 0 && time.Now().Before(deadline); {
			select {
			case <-ls.room:
			case <-time.After(100 * time.Millisecond):
			case <-down:
				return r
			case <-ctx.Done():
				return r
			}
		}
	}
	return r
}

// sendRun is one pass of the pipeline over one connection.
type sendRun struct {
	u      *Upstream
	cancel context.CancelFunc
	failed atomic.Bool
	// stalled: a message of this run could be neither sent nor parked
	// (sendRun.stall); retry ends the run retryAfter later (again).
	// retryMu guards retry and ended (the run is over: no new timer),
	// since a refusal's stall is on paho's reading goroutine.
	stalled    atomic.Bool
	again      atomic.Bool
	retryMu    sync.Mutex
	retry      *time.Timer
	ended      bool
	retryAfter time.Duration

	// Order per device after a refusal. The sender writes ahead of the
	// PUBACKs, so when the broker refuses message N of device D (and N stays
	// queued), D's later messages of this run may already be out, and the
	// broker may accept them. Deleting those would let them reach the cloud
	// before N, which is resent only after the pause. So from the refusal on,
	// this run acknowledges nothing more of D: those messages stay queued
	// and the next run resends them after N, in queue order (duplicates at
	// the cloud, which bastion-origin/bastion-seq let it drop). Other
	// devices' PUBACKs still delete theirs. held is touched only after a
	// refusal; refused keeps the check a single atomic load until then.
	refused atomic.Bool
	heldMu  sync.Mutex
	held    []string // devices with a refused message kept in the queue

	// For poisonWatch. The sender sets the last QoS 1 PUBLISH it wrote, its
	// device, when, and whether it was then the only one awaiting a PUBACK
	// (single); paho's reading goroutine counts the broker's answers
	// (PUBACKs, successes or refusals) and the highest seq answered. The
	// broker answers in the order it received them.
	written    uint64
	writtenDev string
	writtenAt  time.Time
	single     bool
	acks       atomic.Uint64
	ackedTo    atomic.Uint64
	// conn is how the run's connection ends, and what the broker answered
	// on it over all its runs (nil: not a packetConn, in some tests);
	// writtenWrite is the connection's write that carried written.
	conn         *connEnd
	writtenWrite uint64
}

// answered records the broker's PUBACK for seq (on paho's reading
// goroutine, the only writer).
func (r *sendRun) answered(seq uint64) {
	r.acks.Add(1)
	if seq > r.ackedTo.Load() {
		r.ackedTo.Store(seq)
	}
}

// end is how the run's connection ended (once it has).
func (r *sendRun) end() endState {
	if r.conn == nil {
		return endState{}
	}
	return r.conn.state()
}

// stall leaves e, which can be neither sent nor parked (err says why), in
// the queue, and with it every later message of its device in this run;
// it returns stalled with e's device added. The run goes on with the other
// devices'. The next run (the next connection, or RetryParked or
// DropParked making room in the parking queue) tries e again. room is
// Upstream.roomMade read before e's parking was tried: a RetryParked or
// DropParked that ended after that, but before this run counted as stalled,
// found nothing to wake (retryStalled), so the run starts again itself.
func (r *sendRun) stall(stalled map[string]bool, e queue.Entry, room uint64, err error) map[string]bool {
	if stalled == nil {
		stalled = map[string]bool{}
	}
	stalled[e.Device] = true
	r.stallDevice(e.Device, e.Seq, room, err)
	return stalled
}

// stallDevice is stall without the sender's map, for the sender and for a
// refusal on paho's reading goroutine (puback, which holds the device
// instead).
func (r *sendRun) stallDevice(dev string, seq, room uint64, err error) {
	r.retryMu.Lock()
	if !r.ended {
		// Not for a run that is over (a refusal read after it ended): the
		// next run, which sends the message again, may have read past it
		// already, and nothing would end the stall.
		r.u.stalls.add(dev, r, seq)
	}
	if !r.stalled.Swap(true) && !r.ended {
		// Room may also come without an operator (the disk the parking
		// queue failed on has room again, the burst refills): the run
		// starts again from the queue's head after a while.
		r.retry = time.AfterFunc(r.retryAfter, r.rerun)
	}
	r.retryMu.Unlock()
	// After stalled is set: retryStalled counts the room, then looks at
	// stalled, so either it sees this run stalled or this sees its count.
	if r.u.roomMade.Load() != room {
		r.rerun()
	}
	r.u.setError(fmt.Errorf("%w; it stays queued, and %s's later messages wait behind it (order per device) while other devices' messages flow; it is tried again when parked messages are retried or dropped, within %s, and on the next connection", err, dev, r.retryAfter))
}

// endRetry stops the retry timer when the run is over.
func (r *sendRun) endRetry() {
	r.retryMu.Lock()
	defer r.retryMu.Unlock()
	r.ended = true
	if r.retry != nil {
		r.retry.Stop()
	}
}

// rerun ends the run, for the sender to start the next one at once from the
// queue's head.
func (r *sendRun) rerun() {
	r.again.Store(true)
	r.cancel()
}

// fail ends the run on a failure other than the connection going down.
func (r *sendRun) fail(err error) {
	if !r.failed.Swap(true) {
		r.u.setError(err)
	}
	r.cancel()
}

// hold stops this run from acknowledging more of dev's messages.
func (r *sendRun) hold(dev string) {
	r.heldMu.Lock()
	if !slices.Contains(r.held, dev) {
		r.held = append(r.held, dev)
	}
	r.heldMu.Unlock()
	r.refused.Store(true)
}

// holds reports whether dev's PUBACKs in this run no longer delete
// anything. Until a refusal it is one atomic load, inlined into the PUBACK
// loop.
func (r *sendRun) holds(dev string) bool {
	return r.refused.Load() && r.isHeld(dev)
}

func (r *sendRun) isHeld(dev string) bool {
	r.heldMu.Lock()
	defer r.heldMu.Unlock()
	return slices.Contains(r.held, dev)
}

// puback completes PUBLISH seq from device dev (on paho's receive
// goroutine): only a success deletes it from the queue. A refusal keeps it
// (unless it is parked) and holds back dev's later messages of this run
// (see sendRun). A refusal that resending can change ends the run, and the
// link retries from the queue's head after a pause. A permanent one that
// could not be parked stalls dev alone, as a message the link cannot send
// or park does (sendRun.stall): the run goes on with the other devices'
// messages, and it is tried again when parked messages are retried or
// dropped, or retryAfter later. Ending the run for it made the whole link
// back off, up to backoff_max, and start again at the same message.
func (r *sendRun) puback(seq uint64, dev string, reason byte) {
	u := r.u
	if reason >= 0x80 {
		u.m.publishErrors.Inc()
		why := fmt.Sprintf("PUBACK reason 0x%02x (%s)", reason, pubackReason(reason))
		room := u.roomMade.Load()
		handled, perr := u.parkRefused(seq, dev, reason, why)
		if handled {
			return
		}
		r.conn.keep(seq)
		r.hold(dev)
		broker := u.cur.Load().cfg.Broker
		if perr != nil {
			r.stallDevice(dev, seq, room, fmt.Errorf("upstream broker %s refused seq %d from %s for good with %s; it cannot be parked: %w", broker, seq, dev, why, perr))
			return
		}
		r.fail(fmt.Errorf("upstream broker %s refused seq %d from %s with %s; it stays queued and is retried, with %s's messages sent after it (order per device)", broker, seq, dev, why, dev))
		return
	}
	if r.holds(dev) {
		r.conn.keep(seq)
		return // stays queued: resent after the refused one
	}
	if err := u.q.Ack(seq); err != nil {
		r.fail(fmt.Errorf("upstream: ack seq %d in the queue: %w", seq, err))
		return
	}
	u.delivered(1)
}

// acked completes PUBLISHes the broker acknowledged with success, in one
// queue.Ack.
func (r *sendRun) acked(seqs []uint64) {
	if err := r.u.q.Ack(seqs...); err != nil {
		r.fail(fmt.Errorf("upstream: ack seqs %d..%d in the queue: %w", seqs[0], seqs[len(seqs)-1], err))
		return
	}
	r.u.delivered(len(seqs))
}

func (u *Upstream) delivered(n int) {
	u.m.published.Add(float64(n))
	u.mu.Lock()
	u.parks.refill()
	u.st.Published += uint64(n)
	u.mu.Unlock()
}

// prepare applies the current mapping and privacy rules. A withheld message
// is acked (removed) and keep is false. A held one (ActionHold) is an
// error, which ends the run: it stays queued, unsent, with every message
// after it, and the link tries again after a pause.
func (u *Upstream) prepare(e queue.Entry, mapped *mappedTopics) (topic string, payload []byte, keep bool, _ error) {
	s := u.cur.Load()
	topic, ok := mapped.mapUp(s, e.Device, e.Topic)
	if !ok {
		u.withheldQueued(e, "unmapped")
		return "", nil, false, u.q.Ack(e.Seq)
	}
	v, payload, reason, _ := applyRules(s.cfg.Forward, e.Topic, e.Payload)
	switch v {
	case withhold:
		u.withheldQueued(e, reason)
		return "", nil, false, u.q.Ack(e.Seq)
	case hold:
		return "", nil, false, fmt.Errorf("upstream: the privacy forwarding rules cannot be read (%s); seq %d from %s and every message after it stay queued, unsent, until they can be", reason, e.Seq, e.Device)
	}
	return topic, payload, true, nil
}

// withheldQueued counts a queued message deleted at send because the
// mapping or the privacy rules changed since it was accepted, and says so
// at most once a minute: its device was told it was accepted, so an
// operator who mistyped a mapping in a reload must be able to see what it
// cost.
func (u *Upstream) withheldQueued(e queue.Entry, reason string) {
	u.withheld(reason)
	u.m.withheldQueued.WithLabelValues(reason).Inc()
	u.lines.Line(u.log, slog.LevelWarn, "queued_withheld", "upstream: queued messages deleted unsent: the mapping or privacy rules changed after they were accepted (bastion_upstream_withheld_queued_total)",
		"device", e.Device, "topic", e.Topic, "seq", e.Seq, "reason", reason)
}

// appendPublish appends one MQTT v5 PUBLISH with the user properties
// origin and seq. It is encoded here rather than by paho's
// packets.Publish.WriteTo, which builds the packet from several buffers and
// a properties struct (about 900 bytes allocated per message);
// TestAppendPublish checks the bytes are the same as paho's.
func appendPublish(b []byte, id uint16, qos byte, topic string, payload []byte, gateway string, seq uint64) []byte {
	var seqBuf [20]byte
	seqStr := strconv.AppendUint(seqBuf[:0], seq, 10)
	props := 1 + 2 + len(OriginProperty) + 2 + len(gateway) + 1 + 2 + len(SeqProperty) + 2 + len(seqStr)
	rem := 2 + len(topic) + vbiLen(props) + props + len(payload)
	if qos > 0 {
		rem += 2
	}
	b = append(b, packets.PUBLISH<<4|qos<<1)
	b = appendVBI(b, rem)
	b = appendString(b, topic)
	if qos > 0 {
		b = append(b, byte(id>>8), byte(id))
	}
	b = appendVBI(b, props)
	b = append(b, 0x26) // user property
	b = appendString(b, OriginProperty)
	b = appendString(b, gateway)
	b = append(b, 0x26)
	b = appendString(b, SeqProperty)
	b = append(b, byte(len(seqStr)>>8), byte(len(seqStr)))
	b = append(b, seqStr...)
	return append(b, payload...)
}

// publishLen is the length of the packet appendPublish appends.
func publishLen(qos byte, topic string, payload []byte, gateway string, seq uint64) int {
	var seqBuf [20]byte
	props := 1 + 2 + len(OriginProperty) + 2 + len(gateway) + 1 + 2 + len(SeqProperty) + 2 + len(strconv.AppendUint(seqBuf[:0], seq, 10))
	rem := 2 + len(topic) + vbiLen(props) + props + len(payload)
	if qos > 0 {
		rem += 2
	}
	return 1 + vbiLen(rem) + rem
}

// appendString appends an MQTT UTF-8 string: two length bytes, then s.
func appendString(b []byte, s string) []byte {
	return append(append(b, byte(len(s)>>8), byte(len(s))), s...)
}

// appendVBI appends n as an MQTT variable byte integer.
func appendVBI(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func vbiLen(n int) int {
	l := 1
	for n >= 128 {
		n /= 128
		l++
	}
	return l
}

// maxDownlinkPacket is the Maximum Packet Size the link announces in its
// CONNECT (MQTT v5 §3.1.2.11.4), and the most it reads of one packet from
// the broker (packetConn.scan refuses a larger one before paho allocates
// it). A command is kept in memory as its device's last command until the
// device takes it; the gateway refuses commands larger than its enabled
// device transports carry (deliverCommand: with the defaults, MQTT's
// 64 KiB packet limit; mqtt.max_packet_size may be set higher, up to
// 16 MiB, and then commands are still bounded here).
const maxDownlinkPacket = 256 << 10

// downlinkReceiveMaximum is the Receive Maximum the link announces in its
// CONNECT (MQTT v5 §3.1.2.11.3): the broker keeps at most this many QoS 1
// commands unacknowledged at the link. Unset, it is 65,535: that many
// commands of up to maxDownlinkPacket each could be outstanding (and paho
// sizes its queue of received PUBLISHes by it). Commands are few and are
// handed off at once (Deliver), so a handful in flight loses nothing; 16
// bounds what the broker can push ahead of the link to 16 × 256 KiB.
const downlinkReceiveMaximum = 16

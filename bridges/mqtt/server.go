// Package mqtt terminates MQTT 3.1.1 and 5 over TLS from devices with an
// embedded mochi-mqtt broker. A client certificate (or, where allowed, a
// per-device secret over TLS) proves the device; the MQTT client id must be
// that device's id, and a device may publish only devices/{id}/t/... and
// devices/{id}/s/... and subscribe only devices/{id}/c/... and the
// read-only bastion/broadcast/ tree. Telemetry goes to the gateway's Sink
// before it is acknowledged. There is no cleartext listener.
package mqtt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki"
)

// Config is what the server needs from the gateway configuration.
type Config struct {
	Listen          string
	AllowSecretAuth bool
	MaxPacketSize   int // bytes (default 64 KiB)
	// MaxPayload bounds a device message's payload, as CoAP's max_payload
	// does (default MaxPacketSize); larger publishes are refused (MQTT 5:
	// PUBACK 0x95); a retained message (a publish or a Will) is refused
	// so when its topic, payload and properties together exceed it by
	// more than 1 KiB (sizeRefusal). A connection's CONNECT, read before
	// the device is authenticated, may be 4 KiB larger (its Will payload
	// and the rest: connectOverhead), at most MaxPacketSize.
	MaxPayload int
	// ReceiveMaximum is the QoS 1 messages a client may have unacknowledged
	// towards the gateway, and MaxInflight those the gateway keeps towards a
	// client (defaults 32 and 64).
	ReceiveMaximum uint16
	MaxInflight    uint16
	// MaxHeldBytes bounds what the broker holds for one device session
	// of the commands sent to it (default 64 KiB): QoS 1 ones until the
	// device acknowledges them, also while it is disconnected (for the
	// SessionExpiry its session is kept), QoS 0 ones until they are
	// written; each counted with about 1 KiB of the broker's own
	// (mochi.HeldSize). MaxHeldBytesTotal bounds them over all sessions
	// (default 16 MiB: a small command for each of 10,000 devices). A
	// command past either is not taken for the session (counted
	// commands_held); to keep within MaxHeldBytesTotal the commands held
	// for disconnected sessions are dropped first, the session
	// disconnected longest first (commands_evicted; held.go). A session
	// holding nothing takes one command of any size.
	MaxHeldBytes      int64
	MaxHeldBytesTotal int64
	// MaxKeepalive caps the keepalive a client asks for; a client asking
	// for none gets this one (default 5 min), so idle dead sessions end.
	MaxKeepalive uint16
	// SessionExpiry bounds how long a disconnected session is kept
	// (default 1 h).
	SessionExpiry time.Duration
	// HandshakeTimeout bounds the TLS handshake and the wait for CONNECT
	// (default 10 s).
	HandshakeTimeout time.Duration
	// Retained stores retained messages so that they survive a restart.
	// Nil keeps them in memory only.
	Retained RetainedStore
	// KeepRetained, if set, says whether a retained message on topic may
	// be kept (the gateway: not a firmware status report while the
	// firmware.status opt-out is on). A publish or Will it refuses is
	// taken as one not retained: neither the broker nor the store keeps
	// it; a stored one it refuses is not loaded at start (nor deleted:
	// DropRetainedNotKept does that). An empty retained publish, which
	// clears the topic, is always taken. It runs for every retained
	// publish and must not block.
	KeepRetained func(topic string) bool
	// MaxRetained bounds the topics one device may hold a retained message
	// on (default 16): each is a synced write to the store and stays in
	// memory. Replacing or clearing one is always allowed.
	MaxRetained int
	// RetainedBurst and RetainedEvery bound how often one device's
	// retained messages (publishes and Wills) are written to the store:
	// RetainedBurst writes at once, then one more every RetainedEvery
	// (defaults 16, so that a device can write each of the default
	// MaxRetained topics as it starts, and 500 ms: two a second). One past
	// it is refused as a publish to a full queue is (retainRate,
	// authHook.refuseRetained).
	RetainedBurst int
	RetainedEvery time.Duration
	// SecretLockout limits failed secret logins per source address and
	// per IPv6 /64 (see DefaultSecretLockout, which a zero value takes; a
	// zero PrefixFree or PrefixEvery takes the default's); Now is its
	// clock (default time.Now).
	SecretLockout SecretLockout
	Now           func() time.Time
	// MaxUnauthPerSource, MaxUnauthPerPrefix and MaxUnauth bound the
	// connections not yet authenticated (in the TLS handshake or before
	// their CONNECT was accepted) from one source address, from one IPv6
	// /64 (a link-local one per interface) and in all (defaults 16, 64
	// and 512; see tlsListener.admit): past the address's bound the new
	// one is closed at once, past the /64's the /64's oldest, past
	// MaxUnauth the oldest of all; each counted as handshake_limit.
	MaxUnauthPerSource int
	MaxUnauthPerPrefix int
	MaxUnauth          int
	// MaxSubscriptions bounds one client's subscriptions (default 32); a
	// filter past it gets SUBACK 0x97 (3.1.1: 0x80). Each is kept in the
	// broker's topic tree, also for an hour after the session ends.
	MaxSubscriptions int
	// WriteTimeout bounds one write to a device that does not read it
	// (default 30 s); the session is closed then. mochi's keepalive
	// deadline covered writes too, and every packet the device sent moved
	// it on: a device that stopped reading and kept sending held a write,
	// and the broker's lock of its session, as long as it liked. (EMQX's
	// send_timeout, 15 s, does the same.)
	WriteTimeout time.Duration
	// CertSweep is how often the certificates of the open certificate
	// sessions are checked (default hub.DefaultCertSweep, 5 s): a session
	// whose certificate expired, was retired or was revoked is closed at
	// the next check (certsweep.go). Secret-login sessions have none.
	CertSweep time.Duration
}

// SecretLockout: from the Free-th failed secret login from one source
// address on, each failure locks the address out for Base·2^(n-Free), at
// most Max; logins from it are refused meanwhile without running argon2id.
// A source with no failure for Forget starts over. A successful secret
// login from it lifts a lockout that came while it was checked but keeps
// the failures, which go on counting (see secretLimit.succeeded). A
// login refused because its device is revoked is not counted: it runs no
// argon2id, and a revoked device that keeps retrying would otherwise lock
// out the devices sharing its address for good.
//
// The addresses of one IPv6 /64 also share a budget of PrefixFree failed
// secret logins, one more every PrefixEvery; while it is spent, secret
// logins from the /64 are refused without running argon2id, except a
// device's login from one of its last addresses it logged in from (see
// secretLimit for why this is a rate limit and not a lockout of the /64,
// and for when that exemption ends).
type SecretLockout struct {
	Free              int
	Base, Max, Forget time.Duration
	PrefixFree        int
	PrefixEvery       time.Duration
}

// DefaultSecretLockout: 20 failures, then 30 s doubling to 10 min. Device
// secrets are 144 random bits, so this is not what stops guessing: it
// keeps one LAN host from holding the two argon2id slots (and every other
// secret device's logins) busy with wrong secrets. Per source only: a
// lockout per device id would let anyone lock a device out by failing in
// its name. Shorter than the console's hour because a device that shares
// its address (behind a NAT) with a failing one is locked out with it.
// An IPv6 /64 may fail 100 times (five addresses' worth), then once every
// 5 s: a host rotating through its /64's addresses gets 12 argon2id runs
// a minute, not all of them.
var DefaultSecretLockout = SecretLockout{Free: 20, Base: 30 * time.Second, Max: 10 * time.Minute, Forget: time.Hour,
	PrefixFree: 100, PrefixEvery: 5 * time.Second}

func (c *Config) defaults() {
	if c.MaxPacketSize <= 0 {
		c.MaxPacketSize = 64 * 1024
	}
	if c.MaxPayload <= 0 || c.MaxPayload > c.MaxPacketSize {
		c.MaxPayload = c.MaxPacketSize
	}
	if c.ReceiveMaximum == 0 {
		c.ReceiveMaximum = 32
	}
	if c.MaxInflight == 0 {
		c.MaxInflight = 64
	}
	if c.MaxHeldBytes <= 0 {
		c.MaxHeldBytes = 64 << 10
	}
	if c.MaxHeldBytesTotal <= 0 {
		c.MaxHeldBytesTotal = 16 << 20
	}
	if c.MaxKeepalive == 0 {
		c.MaxKeepalive = 300
	}
	if c.SessionExpiry <= 0 {
		c.SessionExpiry = time.Hour
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.MaxRetained <= 0 {
		c.MaxRetained = 16
	}
	if c.RetainedBurst <= 0 {
		c.RetainedBurst = 16
	}
	if c.RetainedEvery <= 0 {
		c.RetainedEvery = 500 * time.Millisecond
	}
	if c.SecretLockout == (SecretLockout{}) {
		c.SecretLockout = DefaultSecretLockout
	}
	if c.SecretLockout.PrefixFree <= 0 {
		c.SecretLockout.PrefixFree = DefaultSecretLockout.PrefixFree
	}
	if c.SecretLockout.PrefixEvery <= 0 {
		c.SecretLockout.PrefixEvery = DefaultSecretLockout.PrefixEvery
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.MaxUnauthPerSource <= 0 {
		c.MaxUnauthPerSource = 16
	}
	if c.MaxUnauthPerPrefix <= 0 {
		c.MaxUnauthPerPrefix = 64
	}
	if c.MaxUnauth <= 0 {
		c.MaxUnauth = 512
	}
	if c.MaxSubscriptions <= 0 {
		c.MaxSubscriptions = 32
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 30 * time.Second
	}
	if c.CertSweep <= 0 {
		c.CertSweep = hub.DefaultCertSweep
	}
}

// readBufferSize is mochi's per-client bufio.Reader in front of the
// tls.Conn. crypto/tls already holds the whole decrypted record and returns
// at most one record per Read, so a larger buffer batches nothing; bodies
// larger than it are read straight into the packet. 512 bytes hold a
// typical telemetry PUBLISH; mochi's default (2 KiB) cost 1.5 KiB more per
// idle session.
const readBufferSize = 512

// writesPending sizes mochi's per-client outbound queue (a channel of
// pointers allocated in full when the client connects: 8 bytes a slot).
// QoS 1 deliveries to a client are bounded by maxInflight before they reach
// the queue (mochi refuses the next one with quota exceeded), so the queue
// needs maxInflight slots for them plus room for a burst of QoS 0
// broadcasts; a QoS 0 packet finding the queue full is dropped, which QoS 0
// allows. mochi's default (8192) cost 64 KiB per connection and the
// earlier 4×inflight 2 KiB.
func writesPending(maxInflight uint16) int32 { return int32(maxInflight) + 32 }

// BroadcastPrefix is the gateway-owned topic tree every device may read.
const BroadcastPrefix = hub.BroadcastPrefix

// Server is the MQTT-over-TLS front end.
type Server struct {
	cfg Config
	id  bridges.Identity
	hub *hub.Hub
	m   *hub.Metrics
	log *slog.Logger
	// lines spaces the lines about refusals anyone on the network can
	// cause before a device is authenticated (refusalLine); devLines those
	// about what an authenticated device sends that is refused
	// (deviceLine).
	lines    *ratelog.Every
	devLines *ratelog.Every
	mq       *mochi.Server
	tls      *tlsListener

	mu     sync.Mutex
	authed map[*mochi.Client]string // client → device, for the session gauge
	subID  int
	// conns holds each connection by its client id (which its
	// credentials must prove: the device) from the start of its CONNECT's
	// credential check until it ends (under mu). Revocation and a newer
	// session of the device find every session here, also one mochi's
	// Clients does not hold (not added yet, or no longer: a session
	// expiry or takeover racing with it), and a connection still being
	// checked is marked instead (pipeConn.revokedInCheck).
	conns map[string][]*pipeConn
	// seq numbers the connections in the order they are registered (the
	// order their CONNECTs reached the credential check), under mu.
	seq uint64
	// ending holds the sessions disconnect is ending that have no
	// pipeConn to mark (not a device TLS connection of this listener),
	// until they are closed (under mu; markEnding).
	ending map[*mochi.Client]struct{}

	// secrets counts failed secret logins by source address and IPv6 /64.
	secrets *secretLimit
	// retains bounds each device's retained writes (retainRefusal).
	retains *retainRate
	// connectLimit bounds a connection's first packet, its CONNECT, read
	// before the device is authenticated (tlsListener.firstPacketFits).
	connectLimit int

	deadline *hub.SharedDeadline

	// roomMu serialises makeRoom, so that commands delivered side by side
	// do not each drop a session's held commands for the same room.
	roomMu sync.Mutex

	// afterAccept, if set (tests only), runs in accept once it has
	// released mu.
	afterAccept func(cl *mochi.Client)
}

// New builds the broker and binds its TLS listener.
func New(cfg Config, cert *pki.ServerCert, id bridges.Identity, h *hub.Hub, log *slog.Logger) (*Server, error) {
	cfg.defaults()
	s := &Server{cfg: cfg, id: id, hub: h, m: h.Metrics(), log: log.With("component", "mqtt"), authed: map[*mochi.Client]string{},
		lines: ratelog.New(refusalLogEvery), devLines: ratelog.New(deviceLineEvery),
		conns: map[string][]*pipeConn{}, deadline: &hub.SharedDeadline{Timeout: acceptTimeout}}
	s.secrets = newSecretLimit(cfg.SecretLockout)
	s.retains = newRetainRate(cfg.RetainedBurst, cfg.RetainedEvery)
	s.connectLimit = min(cfg.MaxPacketSize, cfg.MaxPayload+connectOverhead)
	caps := mochi.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = uint32(cfg.MaxPacketSize)
	caps.ReceiveMaximum = cfg.ReceiveMaximum
	caps.MaximumInflight = cfg.MaxInflight
	caps.MaximumQos = 1
	caps.MaximumSessionExpiryInterval = uint32(cfg.SessionExpiry.Seconds())
	caps.MaximumMessageExpiryInterval = int64(cfg.SessionExpiry.Seconds())
	caps.SharedSubAvailable = 0
	// No topic aliases: mochi's default (65535) let a device fill a table
	// that large per session, and the ACL runs before an alias is resolved,
	// so an alias-only publish was refused anyway. mochi never announced
	// the maximum in CONNACK, so a conforming client used none: with 0 a
	// client using one is disconnected (MQTT 5: 0x94 topic alias invalid).
	caps.TopicAliasMaximum = 0
	caps.MaximumSubscriptionsPerClient = cfg.MaxSubscriptions
	caps.MaximumClientWritesPending = writesPending(cfg.MaxInflight)
	caps.MaximumClientHeldBytes = cfg.MaxHeldBytes
	caps.MaximumHeldBytes = cfg.MaxHeldBytesTotal
	// An acknowledgement carries no property of the packet it answers:
	// mochi copied a PUBLISH's into its PUBACK, so a device's user
	// properties came back to it (and took the PUBACK off its fast path).
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	s.mq = mochi.New(&mochi.Options{
		Capabilities:             caps,
		InlineClient:             true,
		ClientNetReadBufferSize:  readBufferSize,
		ClientNetWriteBufferSize: 2048,
		Logger:                   s.log.With("lib", "mochi"),
	})
	if err := s.mq.AddHook(&authHook{s: s}, nil); err != nil {
		return nil, err
	}
	if cfg.Retained != nil {
		if err := s.mq.AddHook(&retainHook{st: cfg.Retained, log: s.log, s: s}, nil); err != nil {
			return nil, err
		}
	}
	clientAuth := tls.RequireAnyClientCert
	if cfg.AllowSecretAuth {
		clientAuth = tls.RequestClientCert
	}
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return nil // secret login; checked at CONNECT
		}
		dev, err := id.VerifyCert(raw)
		if err != nil {
			if dev == "" {
				dev = hub.ClaimedDevice(raw)
			}
			reason := hub.CertRefusal(err)
			s.m.Refused.WithLabelValues(hub.MQTT, reason).Inc()
			// Anyone can present a certificate (self-signed, any CN): one
			// line per reason per interval, the claimed id and the error
			// (which quotes the CN) cut.
			s.refusalLine(slog.LevelWarn, "cert:"+reason, "mqtt: handshake refused: device certificate not accepted",
				"device", ratelog.Clip(dev, ratelog.MaxText), "reason", reason, "err", ratelog.ClipErr(err))
			return &certRefused{err}
		}
		return nil
	}
	s.tls = &tlsListener{s: s, id: "tls", addr: cfg.Listen, cfg: pki.TLSServer(cert, clientAuth, verify),
		limit: bridges.NewSourceLimit[net.Conn](cfg.MaxUnauthPerSource, cfg.MaxUnauthPerPrefix, cfg.MaxUnauth)}
	if err := s.mq.AddListener(s.tls); err != nil {
		return nil, fmt.Errorf("mqtt: listen tcp %s: %w", cfg.Listen, err)
	}
	id.OnRevoke(s.disconnect)
	h.AddMirror(hub.MQTT, s.mirror)
	return s, nil
}

// Addr returns the bound address.
func (s *Server) Addr() string { return s.tls.Address() }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	if err := s.mq.Serve(); err != nil {
		return fmt.Errorf("mqtt: serve: %w", err)
	}
	swept := make(chan struct{})
	go func() { defer close(swept); s.sweepCerts(ctx) }()
	s.log.Info("mqtt: listening", "addr", s.Addr())
	<-ctx.Done()
	<-swept
	err := s.mq.Close()
	s.deadline.Stop()
	return err
}

// mirror publishes telemetry from other transports and commands to local
// MQTT subscribers through the broker's inline client. It reports whether
// a device's session took the message: was sent it, or holds it for its
// next connection (a QoS 1 subscription of a session kept after its
// connection). A session that holds as much as it may does not take it
// (authHook.OnPublishDropped counts and logs that), nor does a
// disconnected session with a QoS 0 subscription.
func (s *Server) mirror(m bridges.Message) bool {
	// Most CoAP telemetry has no local subscriber: publishing it into the
	// broker anyway (a packet injected through the broker's whole publish
	// path) was about 9 % of the CPU of a CoAP request.
	if !s.mq.Topics.HasSubscribers(m.Topic) {
		return false
	}
	if _, ok := hub.CommandPath(m.Device, m.Topic); ok {
		s.makeRoom(m)
	}
	taken, err := s.mq.PublishTaken(m.Topic, m.Payload, false, m.QoS)
	if err != nil {
		s.log.Debug("mqtt: local publish failed", "device", m.Device, "topic", m.Topic, "err", err)
		return false
	}
	return taken > 0
}

// Retained returns the retained payload on topic, if the broker holds one.
func (s *Server) Retained(topic string) ([]byte, bool) {
	pk, ok := s.mq.Topics.Retained.Get(topic)
	return pk.Payload, ok
}

// DropRetained drops device's retained messages, those on topics under
// devices/{device}/, from the broker and from the store, for the
// console's erase of a device's data, and returns how many it dropped
// (the larger count of the two: each normally holds the other's). The
// store alone was not enough: the broker kept its copies and gave them to
// every new subscriber until they expired, an hour after their publish.
// The caller revokes the device first, so that none comes back from it.
func (s *Server) DropRetained(device string) (int, error) {
	prefix := bridges.TopicPrefix(device)
	n := 0
	for topic := range s.mq.Topics.Retained.GetAll() {
		if !strings.HasPrefix(topic, prefix) {
			continue
		}
		s.clearRetained(topic)
		n++
	}
	if s.cfg.Retained == nil {
		return n, nil
	}
	stored, err := s.cfg.Retained.DeleteRetainedUnder(prefix)
	if err != nil {
		return n, fmt.Errorf("mqtt: drop the retained messages of %s: %w", device, err)
	}
	return max(n, stored), nil
}

// DropRetainedNotKept drops the retained messages KeepRetained now
// refuses from the broker and from the store, and returns how many it
// dropped (the larger count of the two: each normally holds the other's).
// The gateway calls it when the firmware.status opt-out is switched on:
// KeepRetained stops new ones, this drops those kept before.
func (s *Server) DropRetainedNotKept() (int, error) {
	if s.cfg.KeepRetained == nil {
		return 0, nil
	}
	n := 0
	for topic := range s.mq.Topics.Retained.GetAll() {
		if !s.cfg.KeepRetained(topic) {
			s.clearRetained(topic)
			n++
		}
	}
	if s.cfg.Retained == nil {
		return n, nil
	}
	var drop []string
	err := s.cfg.Retained.ForEachRetained(func(topic string, _ []byte) error {
		if !s.cfg.KeepRetained(topic) {
			drop = append(drop, topic)
		}
		return nil
	})
	if err == nil && len(drop) > 0 {
		err = s.cfg.Retained.DeleteRetained(drop...)
	}
	if err != nil {
		return n, fmt.Errorf("mqtt: drop the retained messages no longer kept from the store: %w", err)
	}
	return max(n, len(drop)), nil
}

// clearRetained clears the broker's retained message on topic with an
// empty retained message, as the device's own would, without one being
// published to anyone.
func (s *Server) clearRetained(topic string) {
	s.mq.Topics.RetainMessage(packets.Packet{TopicName: topic, FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}})
	atomic.StoreInt64(&s.mq.Info.Retained, int64(s.mq.Topics.Retained.Len()))
}

// keepRetained says whether a retained message of size bytes on topic
// may be kept (Config.KeepRetained); an empty one, which clears, may.
func (s *Server) keepRetained(topic string, size int) bool {
	return size == 0 || s.cfg.KeepRetained == nil || s.cfg.KeepRetained(topic)
}

// Subscribe lets the gateway itself (not a device) receive what is
// published on filter, e.g. devices/+/t/# for local consumers. fn runs on
// the publishing goroutine and must not block.
func (s *Server) Subscribe(filter string, fn func(topic string, payload []byte)) (cancel func(), err error) {
	s.mu.Lock()
	s.subID++
	id := s.subID
	s.mu.Unlock()
	err = s.mq.Subscribe(filter, id, func(_ *mochi.Client, _ packets.Subscription, pk packets.Packet) {
		fn(pk.TopicName, pk.Payload)
	})
	if err != nil {
		return nil, fmt.Errorf("mqtt: inline subscribe %s: %w", filter, err)
	}
	return func() { s.mq.Unsubscribe(filter, id) }, nil
}

// disconnect closes every session of a revoked device, and marks its
// connections whose credentials are being checked, which are then checked
// again before they are accepted (Server.accept, in
// OnConnectAuthenticate), and forgets the addresses the device's secret
// logins came from (secretLimit.revoked: no longer exempt from their
// /64's budget). It must not block (each session gets endWait for its
// DISCONNECT).
func (s *Server) disconnect(device string) {
	s.mu.Lock()
	s.secrets.revoked(device)
	var open []*mochi.Client
	for _, pc := range s.conns[device] {
		if pc.accepted {
			open = append(open, pc.cl)
		} else {
			pc.revokedInCheck = true
		}
	}
	s.mu.Unlock()
	if cl, ok := s.mq.Clients.Get(device); ok && !slices.Contains(open, cl) {
		open = append(open, cl) // not in conns: ended already (skipped below), or not a TLS device connection
	}
	for _, cl := range open {
		if cl.Closed() {
			continue
		}
		if pc, ok := cl.Net.Conn.(*pipeConn); ok {
			if !pc.refused.CompareAndSwap(false, true) {
				// Ended and counted already, by the certificate sweep or an
				// earlier revocation, whose close is under way: counting it
				// here too counted one session's end twice.
				continue
			}
		} else if !s.markEnding(cl) {
			continue // the same, for a session with no pipeConn
		}
		s.log.Info("mqtt: closing session of revoked device", "device", device, "remote", cl.Net.Remote)
		s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonRevoked).Inc()
		s.closeSession(cl)
	}
}

// markEnding reports whether the caller is the first to end cl, a session
// with no pipeConn (whose refused flag is the guard of the others), and
// if so marks it. Such a session is ended through mochi's
// DisconnectClient, which writes the DISCONNECT before it closes the
// session: a second revocation meanwhile found it open, and counted its
// end again. A session stays marked until it is closed (Closed is for
// good, so a closed one needs no mark), which keeps the set to the
// sessions being ended.
func (s *Server) markEnding(cl *mochi.Client) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.ending {
		if c.Closed() {
			delete(s.ending, c)
		}
	}
	if _, marked := s.ending[cl]; marked || cl.Closed() {
		return false
	}
	if s.ending == nil {
		s.ending = map[*mochi.Client]struct{}{}
	}
	s.ending[cl] = struct{}{}
	return true
}

// register puts cl's connection pc among the connections of its client id
// before its credentials are checked: a revocation from then on finds it.
func (s *Server) register(pc *pipeConn, cl *mochi.Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pc.cl = cl
	s.seq++
	pc.seq = s.seq
	s.conns[cl.ID] = append(s.conns[cl.ID], pc)
}

// unregister takes pc out of conns once its connection has ended.
func (s *Server) unregister(pc *pipeConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if pc.cl == nil {
		return // never got to its credential check
	}
	id := pc.cl.ID
	if l := slices.DeleteFunc(s.conns[id], func(c *pipeConn) bool { return c == pc }); len(l) == 0 {
		delete(s.conns, id)
	} else {
		s.conns[id] = l
	}
}

// acceptance is what accept decided.
type acceptance int

const (
	acceptOK         acceptance = iota
	acceptRevoked               // the device was revoked during the check: check again
	acceptSuperseded            // a newer connection of the device was accepted first
	acceptEvicted               // closed meanwhile to make room for a newer one (tlsListener.admit)
)

// accept makes cl's connection pc, whose credentials were found good for
// device cl.ID, the device's session, and returns the device's other open
// sessions that it replaces (one session per device): those registered
// before it (Server.register, at the start of their credential checks).
// cert is the certificate the session was authenticated with (nil: a
// secret login), which the sweep checks from then on (certsweep.go);
// secretFrom, for a secret login, is where it came from, proven for the
// device once accepted (secretLimit.succeeded).
// Of two CONNECTs of one device the one that came later wins, however
// long each one's check took: an earlier one whose check (a secret's
// argon2id) ends after a later one was accepted is refused instead
// (acceptSuperseded) and does not end the later session (its device has
// most likely closed the earlier connection already). acceptRevoked
// reports that the device was revoked while the credentials were
// checked: they are to be checked again, and accept called again if still
// good.
//
// Once accepted the connection gives back its slot among the listener's
// unauthenticated ones (SourceLimit.Claim), here, before the sessions it
// replaces are ended (each may take endWait) and its CONNACK is sent, so
// that the limits no longer close it to make room for a newer one. One
// they closed already during its check (a secret's argon2id) is refused
// (acceptEvicted): it ends no other session and proves no address.
//
// Everything is looked up under mu, mochi's Clients too: a connection
// accepted after this one is added to Clients only after its own accept,
// so it is never taken for an older session here. (Looked up after mu
// was released, Clients could already hold the newer session, which this
// one then ended, while the newer one ended this one: no session left.)
// Lock order: mu, then Clients' lock; mochi calls no hook while it holds
// Clients' lock.
func (s *Server) accept(pc *pipeConn, cl *mochi.Client, cert *hub.SessionCert, secretFrom *bridges.Source) (older []*mochi.Client, a acceptance) {
	s.mu.Lock()
	if pc != nil {
		if pc.revokedInCheck {
			pc.revokedInCheck = false
			s.mu.Unlock()
			return nil, acceptRevoked
		}
		for _, o := range s.conns[cl.ID] {
			if o.seq > pc.seq && o.accepted {
				s.mu.Unlock()
				return nil, acceptSuperseded
			}
		}
		// Lock order: Server.mu, then the listener's limit's.
		if pc.unauth != nil && !pc.l.limit.Claim(pc.unauth) {
			s.mu.Unlock()
			return nil, acceptEvicted
		}
		pc.accepted = true
		pc.cert = cert
	}
	if !cl.Closed() { // else ended meanwhile (shutdown): it replaces none
		if pc != nil {
			for _, o := range s.conns[cl.ID] {
				if o.seq < pc.seq && o.accepted && !o.cl.Closed() {
					older = append(older, o.cl)
				}
			}
		}
		// A session of this listener is in conns while it is open; Clients
		// is looked at for any other (not a device's TLS connection).
		if old, ok := s.mq.Clients.Get(cl.ID); ok && old != cl && !old.Closed() {
			if _, dev := old.Net.Conn.(*pipeConn); !dev {
				older = append(older, old)
			}
		}
	}
	if secretFrom != nil {
		// Under mu: a revocation of the device (disconnect) either
		// marked this connection before (acceptRevoked above) or forgets
		// the address after.
		s.secrets.succeeded(s.cfg.Now(), *secretFrom, cl.ID)
	}
	after := s.afterAccept
	s.mu.Unlock()
	if after != nil {
		after(cl)
	}
	return older, acceptOK
}

// endSession ends cl's session at once, whatever its device does: an MQTT
// 5 device gets a DISCONNECT with code if that can be sent within endWait.
// It runs in the revocation callback, in a new connection's CONNECT (the
// takeover) and at shutdown, none of which may wait on a device that
// stopped reading.
func (s *Server) endSession(cl *mochi.Client, code packets.Code, deadline time.Time) {
	pc, ok := cl.Net.Conn.(*pipeConn)
	if !ok {
		s.mq.DisconnectClient(cl, code)
		return
	}
	var pk []byte
	if pc.connacked.Load() {
		// Not before the CONNACK [MQTT-3.14.0-1]: a session ended while it
		// is set up (taken over, revoked) is only closed.
		pk = disconnectPacket(cl, code)
	}
	pc.end(pk, deadline)
	cl.Stop(code)
}

// disconnectPacket encodes the DISCONNECT mochi's DisconnectClient would
// send cl: nil for MQTT 3.1.1, where only clients send one.
func disconnectPacket(cl *mochi.Client, code packets.Code) []byte {
	if cl.Properties.ProtocolVersion != 5 {
		return nil
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: 5,
		ReasonCode: code.Code, Properties: packets.Properties{ReasonString: code.Reason}}
	props := cl.Properties.Props
	pk.Mods.DisallowProblemInfo = props.RequestProblemInfoFlag && props.RequestProblemInfo == 0
	var buf bytes.Buffer
	if err := pk.DisconnectEncode(&buf); err != nil || (props.MaximumPacketSize > 0 && uint32(buf.Len()) > props.MaximumPacketSize) {
		return nil
	}
	return buf.Bytes()
}

// closeSession ends a session whose device is no longer accepted. Its Will
// is dropped (OnWill) and a packet read after this is not taken (OnPublish):
// nothing is taken from a device after its revocation.
func (s *Server) closeSession(cl *mochi.Client) {
	if pc, ok := cl.Net.Conn.(*pipeConn); ok {
		pc.refused.Store(true)
	}
	s.endSession(cl, packets.ErrNotAuthorized, time.Now().Add(endWait))
}

// recheck checks a connection's credentials again once its device was
// revoked while they were being checked (accept): the certificate it
// presented, or its secret. reason is the refusal's label.
func (s *Server) recheck(cl *mochi.Client, pk packets.Packet) (reason string, err error) {
	dev, leaf, err := deviceOf(s.id, cl)
	switch {
	case err != nil:
		return hub.CertRefusal(err), fmt.Errorf("certificate: %w", err)
	case leaf == nil:
		dev = string(pk.Connect.Username)
		if err := s.id.CheckSecret(dev, pk.Connect.Password); err != nil {
			if errors.Is(err, pki.ErrRevoked) {
				return hub.ReasonRevoked, fmt.Errorf("secret: %w", err)
			}
			if errors.Is(err, bridges.ErrBusy) {
				return hub.ReasonBusy, fmt.Errorf("secret: %w", err)
			}
			return hub.ReasonBadSecret, fmt.Errorf("secret: %w", err)
		}
	}
	if dev != cl.ID {
		return hub.ReasonClientID, fmt.Errorf("credentials now prove device %q, not %q", dev, cl.ID)
	}
	return "", nil
}

// retainRefusal says why device may not have a message of size bytes
// retained on topic now (hub.ReasonRetainedLimit, hub.ReasonRetainedRate;
// "" if it may), and takes a write it allows from the device's rate.
//
// The cap: clearing or replacing one of its retained messages always, a
// new topic only below MaxRetained. The count is the broker's own (its
// retained messages under the device's prefix, which is where the ACL
// lets it publish), so it holds across restarts. A device's publishes are
// handled one at a time, so only two sessions of one device overlapping
// in a takeover could pass the cap, by one.
//
// The rate (retainRate): every retained message that writes the store, a
// new one, a replacement or a clearing, counts; an empty one on a topic
// that holds none writes nothing (retainHook.OnRetainMessage) and does
// not. Counted whether or not a store is configured, so that the device
// sees the same broker either way. A message the Sink then refuses has
// spent its write all the same (it is taken first so that nothing
// refused here reaches the Sink).
func (s *Server) retainRefusal(device, topic string, size int) string {
	_, held := s.mq.Topics.Retained.Get(topic)
	switch {
	case size == 0 && !held:
		return ""
	case size > 0 && !held && len(s.mq.Topics.Messages(bridges.TopicPrefix(device)+"#")) >= s.cfg.MaxRetained:
		return hub.ReasonRetainedLimit
	case !s.retains.allow(s.cfg.Now(), device):
		return hub.ReasonRetainedRate
	}
	return ""
}

// refuseRetain counts a retained publish or Will (what) that retainRefusal
// refused for reason and logs it through deviceLine: a device in a loop
// repeats it at the rate it can send (before, the cap's refusals had a
// line each).
func (s *Server) refuseRetain(device, topic, what, reason string) {
	s.m.Refused.WithLabelValues(hub.MQTT, reason).Inc()
	kind := what + ":" + reason
	if reason == hub.ReasonRetainedRate {
		s.deviceLine(slog.LevelWarn, kind, device, "mqtt: "+what+" refused: retained messages written too often; retain a message only when it changes",
			"topic", ratelog.Clip(topic, maxLoggedTopic), "reason", reason, "burst", s.cfg.RetainedBurst, "every", s.cfg.RetainedEvery)
		return
	}
	s.deviceLine(slog.LevelWarn, kind, device, "mqtt: "+what+" refused: too many retained topics; clear one (an empty retained publish) or publish without retain",
		"topic", ratelog.Clip(topic, maxLoggedTopic), "reason", reason, "limit", s.cfg.MaxRetained)
}

// SessionCount returns how many authenticated device sessions are open.
func (s *Server) SessionCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.authed)
}

// Connected reports whether device has an MQTT session open now.
func (s *Server) Connected(device string) bool {
	cl, ok := s.mq.Clients.Get(device)
	return ok && !cl.Closed()
}

// certRefused marks a handshake error already logged and counted by the
// certificate check.
type certRefused struct{ err error }

func (e *certRefused) Error() string { return e.err.Error() }
func (e *certRefused) Unwrap() error { return e.err }

// deviceOf returns the device a connection proved, from its certificate,
// and the certificate's leaf (nil: the connection has no certificate).
func deviceOf(id bridges.Identity, cl *mochi.Client) (string, *x509.Certificate, error) {
	tc, ok := cl.Net.Conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return "", nil, errors.New("not a TLS connection")
	}
	st := tc.ConnectionState()
	if len(st.PeerCertificates) == 0 {
		return "", nil, nil
	}
	raw := make([][]byte, len(st.PeerCertificates))
	for i, c := range st.PeerCertificates {
		raw[i] = c.Raw
	}
	dev, err := id.VerifyCert(raw)
	return dev, st.PeerCertificates[0], err
}

// connectOverhead is what a CONNECT may hold besides its Will payload
// (bounded by MaxPayload): the client id and user name (a device id), a
// secret, a Will topic (the device's prefix and at most hub.MaxPathLen
// bytes) and properties, a few hundred bytes; the rest is room for user
// properties.
const connectOverhead = 4 << 10

// acceptTimeout bounds how long a QoS 1 publish waits for the Sink (the
// durable queue's fsync) before the device is told to retry.
const acceptTimeout = 5 * time.Second

// deviceLineEvery spaces the lines about one device's refused packets,
// refusalLogEvery those of each kind of refusal before a device is
// authenticated.
const (
	deviceLineEvery = 10 * time.Second
	refusalLogEvery = 10 * time.Second
)

// refusalLine logs msg at level with args at most once per kind per
// refusalLogEvery (ratelog.Every.Line): for refusals anyone on the network
// can cause before a device is authenticated (a certificate not accepted,
// plaintext on the TLS port, no client certificate, a failed TLS
// handshake, a CONNECT refused before its credentials proved a device),
// at the rate they can open connections. kind comes from a small set
// (never from text the peer chose). The caller counts each in the metric.
func (s *Server) refusalLine(level slog.Level, kind, msg string, args ...any) {
	s.lines.Line(s.log, level, kind, msg, args...)
}

// deviceLine logs msg at level unless a line of the same kind about the
// same device went out less than deviceLineEvery ago: for refusals of what
// an authenticated device sends (a topic outside its namespace, a payload
// over the limit, a full queue), which a device stuck in a loop repeats at
// the rate it can send. Keyed by device, so one such device does not hide
// the lines about another. The caller counts each in the metric.
func (s *Server) deviceLine(level slog.Level, kind, device, msg string, args ...any) {
	s.devLines.DeviceLine(s.log, level, kind, device, msg, args...)
}

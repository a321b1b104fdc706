// Package coap terminates CoAP over DTLS 1.2 from devices: one listener for
// certificate devices and one for PSK devices (pion/dtls offers only PSK
// suites once a PSK callback is set). Every request is tied to the device
// identity the handshake proved, and a device reaches only its own
// namespace: POST /t/{path} is telemetry on devices/{id}/t/{path}, GET
// /c/{path} (with Observe) receives commands sent to devices/{id}/c/{path}.
// It never listens in cleartext and never decides on its own who a device is.
package coap

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

// Config is what the server needs from the gateway configuration.
type Config struct {
	Listen     string // certificate devices
	PSKListen  string // PSK devices; "" disables
	MaxPayload int    // bytes; larger requests get 4.13
	// HandshakeTimeout bounds one DTLS handshake (default 10s); it derives
	// from the server's context, so shutdown also ends it.
	HandshakeTimeout time.Duration
	// MaxHandshakesPerSource bounds DTLS handshakes in flight from one IP
	// address (default 8), counted from when the client echoed the
	// HelloVerifyRequest cookie (limit.go); more are dropped before any
	// crypto is done.
	MaxHandshakesPerSource int
	// MaxHandshakesPerPrefix bounds them from one IPv6 /64 (default 32;
	// a link-local /64 per interface): a host can take any address of its
	// link's /64. Past it the /64's oldest handshake in flight is ended to
	// make room, not the new one refused (handshakeLimit).
	MaxHandshakesPerPrefix int
	// MaxHandshakes bounds them in all, over both listeners (default
	// 256): each holds a connection and a goroutine until it ends.
	MaxHandshakes int
	// RetryAfter is the Max-Age sent with 5.03 when the Sink is full
	// (default 30s).
	RetryAfter time.Duration
	// IdleTimeout closes a session that has sent nothing for this long
	// (default 10 min; go-coap's own default of 16 s would drop a sleeping
	// device's command observation). A device that comes back after it
	// does a new handshake.
	IdleTimeout time.Duration
	// CertSweep is how often the certificates of the open certificate
	// sessions are checked (default hub.DefaultCertSweep, 5 s): a session
	// whose certificate expired, was retired or was revoked is closed at
	// the next check (certsweep.go).
	CertSweep time.Duration
	// Enroll, if set, admits pairing sessions (see enroll.go).
	Enroll Enrollment
	// Firmware, if set, serves /fw/... (download only), /fw/offer and
	// /fw-status to each session's device (see firmware.go).
	Firmware Firmware
}

func (c *Config) defaults() {
	if c.MaxPayload <= 0 {
		c.MaxPayload = 1024
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.MaxHandshakesPerSource <= 0 {
		c.MaxHandshakesPerSource = 8
	}
	if c.MaxHandshakesPerPrefix <= 0 {
		c.MaxHandshakesPerPrefix = 32
	}
	if c.MaxHandshakes <= 0 {
		c.MaxHandshakes = 256
	}
	if c.RetryAfter <= 0 {
		c.RetryAfter = 30 * time.Second
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 10 * time.Minute
	}
	if c.CertSweep <= 0 {
		c.CertSweep = hub.DefaultCertSweep
	}
}

// acceptTimeout bounds how long a confirmable request waits for the Sink
// (the durable queue's fsync) before it is answered 5.03 with Max-Age.
const acceptTimeout = 5 * time.Second

// Server is the CoAP-over-DTLS front end.
type Server struct {
	cfg Config
	id  bridges.Identity
	hub *hub.Hub
	m   *hub.Metrics
	log *slog.Logger
	lnC *limitListener
	lnP *limitListener
	// hs counts the listeners' handshakes in flight (limit.go).
	hs *handshakeLimit
	// lines spaces the log lines about what anyone on the network can
	// cause (refused handshakes, dropped datagrams): ratelog.go.
	lines *ratelog.Every
	// devLines spaces the lines about what an authenticated device sends
	// that is refused (deviceLine).
	devLines *ratelog.Every
	// dropped is Metrics.Dropped for CoAP (writeDropped).
	dropped prometheus.Counter
	// notifying: the command notifications being written, which a
	// datagram writeDropped hears of may be (notifydrop.go).
	notifying notifyWrites

	closing sync.WaitGroup // revocation closes in progress; Run waits
	// stop is closed when Run's context ends: a close waiting out a grace
	// (endEnrollment) waits no longer.
	stop chan struct{}
	// stopped (under mu) is set before Run waits for closing: no close
	// is added to closing after it (endEnrollment).
	stopped bool
	// bg: answers given later (serveCoAP: from a goroutine of their own,
	// off the listener's read loop; durable.go: deferred telemetry); Run
	// waits.
	bg       sync.WaitGroup
	mu       sync.Mutex
	nSession int
	// revGen counts revocations and ends of enrollment (under mu).
	// onNewConn registers a session only if neither happened since the
	// device's credentials were checked, so neither can miss a session
	// being set up.
	revGen uint64
	// pskSeen hands the PSK callback's answer (device, revGen before the
	// lookup) to onNewConn, which then needs no second store lookup. An
	// entry lives from the callback to the last onNewConn of the
	// identity's handshakes in flight; handshakes that fail after the
	// callback leave it behind, so it is bounded (maxPSKSeen) and cleared
	// when full, which only costs the next sessions a second lookup.
	pskMu   sync.Mutex
	pskSeen map[string]pskAnswer
	// byDevice: most devices have one session, so a slice (not a map)
	// per device keeps an idle session's bookkeeping small.
	byDevice map[string][]*otacache.DTLSConn
	// enrolling: the enrollment sessions of byDevice, bounded in all and
	// per source (enrolllimit.go).
	enrolling enrollLimit
	// deadline bounds a confirmable request's wait for the Sink; watches
	// answer the deferred requests whose deadline ends first (durable.go).
	deadline *hub.SharedDeadline
	watches  deadlineWatches
	// observeHook, set by tests only (export_test.go) before Run, runs on
	// the handler's goroutine at the stages of an Observe registration.
	observeHook func(stage int)
	// handshakeHook, set by tests only (export_test.go), runs on a
	// handshake's goroutine once the handshake has succeeded, before its
	// slot in hs is claimed (handshakeConn.HandshakeContext).
	handshakeHook atomic.Pointer[func()]
	// closeHook, set by tests only (export_test.go), runs on closeAdded's
	// goroutine before it closes the sessions taken out of byDevice.
	closeHook atomic.Pointer[func()]
}

// pskAnswer is what the PSK callback found for an identity.
type pskAnswer struct {
	device string
	gen    uint64 // revGen before the latest lookup
	n      int    // handshakes past the callback, not yet in onNewConn
}

const maxPSKSeen = 4096

// session is one authenticated DTLS association.
type session struct {
	device string
	mode   string // "cert" or "psk"
	cc     *otacache.DTLSConn
	// cert is the certificate a "cert" session was established with (nil
	// for PSK), which the sweep checks (certsweep.go); set before the
	// session is registered, then only read.
	cert *hub.SessionCert
	// mu guards obs, closed and seq, and is held across numbering and
	// writing each notification (handler.go: session.send).
	mu     sync.Mutex
	obs    map[string]*observation // observe token → registration; made on first use
	closed bool
	seq    uint32
	enroll enrollInfo // what the session may reach (enroll.go)
	// inline: requests are answered on the DTLS listener's read loop
	// (Server.inline); set before the first request, then only read.
	inline bool
	// blocking counts the requests answered on goroutines of their own
	// (serveCoAP), at most maxBlockingPerSession.
	blocking atomic.Int32
	// ended is the refusal reason (a string) the session's end was counted
	// under, set under Server.mu as revoke or the certificate sweep takes
	// the session out of byDevice; nil while it lives. Its close comes
	// later (closeLater), and a request it sends meanwhile is refused
	// (serveSession): served, it reached the Sink and had the hub remember
	// the device it had just forgotten (hub.Forget).
	ended atomic.Value
}

// New binds the listeners (so a port clash is reported before Run).
func New(cfg Config, cert *pki.ServerCert, id bridges.Identity, h *hub.Hub, log *slog.Logger) (*Server, error) {
	cfg.defaults()
	s := &Server{cfg: cfg, id: id, hub: h, m: h.Metrics(), log: log.With("component", "coap"),
		byDevice: map[string][]*otacache.DTLSConn{}, pskSeen: map[string]pskAnswer{},
		deadline: &hub.SharedDeadline{Timeout: acceptTimeout}, lines: ratelog.New(refusalLogEvery),
		devLines: ratelog.New(refusalLogEvery), stop: make(chan struct{})}
	s.dropped = s.m.Dropped.WithLabelValues(hub.CoAP)
	s.hs = bridges.NewSourceLimit[*handshakeConn](cfg.MaxHandshakesPerSource, cfg.MaxHandshakesPerPrefix, cfg.MaxHandshakes)
	var err error
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		dev, err := id.VerifyCert(raw)
		if err != nil {
			if dev == "" {
				dev = hub.ClaimedDevice(raw)
			}
			reason := credentialRefusal(err, true)
			s.m.Refused.WithLabelValues(hub.CoAP, reason).Inc()
			// Anyone can present a certificate: one line per reason per
			// interval, the claimed id and the error cut.
			s.refusalLine("cert:"+reason, "coap: handshake refused: device certificate not accepted",
				"device", ratelog.Clip(dev, ratelog.MaxText), "reason", reason, "err", ratelog.ClipErr(err))
		}
		return err
	}
	s.lnC, err = s.listen(cfg.Listen, pki.DTLSCertServer(cert, verify))
	if err != nil {
		return nil, err
	}
	if cfg.PSKListen != "" {
		psk := func(identity []byte) ([]byte, error) {
			gen := s.revocations()
			dev, key, err := id.PSK(identity)
			if err == nil && !strings.Contains(dev, ":") {
				// Enrollment identities (they hold a ':') are looked up
				// again in onNewConn: their pairing window may have closed.
				s.pskMu.Lock()
				a, ok := s.pskSeen[string(identity)]
				if !ok && len(s.pskSeen) >= maxPSKSeen {
					clear(s.pskSeen)
				}
				switch {
				case !ok || a.device != dev:
					a = pskAnswer{device: dev, gen: gen}
				case gen > a.gen:
					// Revocation is for good: a device found valid after
					// revocation gen was valid at every earlier one too.
					a.gen = gen
				}
				a.n++
				s.pskSeen[string(identity)] = a
				s.pskMu.Unlock()
			}
			if err != nil {
				reason := credentialRefusal(err, false)
				s.m.Refused.WithLabelValues(hub.CoAP, reason).Inc()
				// Anyone can send any identity, up to 64 KiB of it: one
				// line per reason per interval, the identity cut (the log
				// handler quotes it), and the error (which may quote it) cut.
				s.refusalLine("psk:"+reason, "coap: handshake refused: PSK identity not accepted",
					"device", dev, "psk_identity", loggedIdentity(identity), "reason", reason, "err", ratelog.ClipErr(err))
			}
			return key, err
		}
		s.lnP, err = s.listen(cfg.PSKListen, pki.DTLSPSKServer(psk))
		if err != nil {
			s.lnC.Close()
			return nil, err
		}
	}
	id.OnRevoke(s.revoke)
	if e, ok := cfg.Enroll.(EnrollmentEnd); ok {
		e.OnEnrollmentEnd(s.endEnrollment)
	}
	return s, nil
}

// listen binds one DTLS listener and the plaintext guard next to it.
func (s *Server) listen(addr string, opts []piondtls.ServerOption) (*limitListener, error) {
	g := newPlaintextGuard(s.log, s.m)
	// WithStatelessHelloVerify: no state for a ClientHello until its
	// cookie comes back (limit.go). WithOnWriteDropped: a datagram the
	// socket has no room for is dropped, never waited for (writeDropped).
	// WithOnReadDropped, WithOnFragmentDropped: what pion drops at its
	// bounds of what a peer can make a session hold is counted and logged
	// (readDropped, fragmentDropped).
	opts = append(opts, piondtls.WithListenConfig(g.listenConfig()), piondtls.WithStatelessHelloVerify(true),
		piondtls.WithOnWriteDropped(s.writeDropped), piondtls.WithOnReadDropped(s.readDropped),
		piondtls.WithOnFragmentDropped(s.fragmentDropped))
	ln, err := coapnet.NewDTLSListener("udp", addr, coapnet.NewDTLSServerOptions(opts...))
	if err != nil {
		return nil, fmt.Errorf("coap: listen udp %s: %w", addr, err)
	}
	if err := g.open(ln.Addr()); err != nil {
		ln.Close()
		return nil, err
	}
	l := s.limit(ln)
	l.guard = g
	return l, nil
}

// writeDropped counts, and logs at most once per refusalLogEvery, a
// datagram a listener dropped because its socket had no room for it
// (pion-dtls patch (52)): no write on a listener's socket, which all its
// sessions and its HelloVerifyRequests share, waits for room. A write that
// waited held every other writer of the listener behind it: the durable
// queue's writer answering deferred telemetry (and with it every QoS 1
// commit of every transport), the hub's delivery of commands, and the
// listener's read loop; anyone on the LAN can keep the buffer full
// (ClientHellos from made-up addresses, whose answers wait in the kernel
// for neighbour resolution). What is dropped is sent again: DTLS
// retransmits its flights, a device retransmits a confirmable request and
// gets the answer from the response cache; a command notification (NON)
// is lost, and the device has the command at its next GET or Observe
// registration (such a notification is not counted as a command sent:
// notifyWrites). It runs on the writer's goroutine and must not block.
func (s *Server) writeDropped(to netip.AddrPort, size int) {
	s.dropped.Inc()
	s.notifying.drop(unmapped(to))
	s.refusalLine("write_dropped", "coap: datagram not sent: the DTLS listener's socket has no room (send buffer full); dropped, the peer retransmits (bastion_transport_datagrams_dropped_total)",
		"device", "", "remote", to.String(), "size", size)
}

// Refusal reasons of the datagrams and records pion-dtls drops at its
// bounds of what a peer can make a session hold (third_party/README.md,
// pion-dtls (55), (56)): counted in Metrics.Refused, as what the package
// refuses, since Metrics.Dropped is for datagrams not sent.
const (
	// reasonReadQueueFull: a datagram for a DTLS connection whose queue of
	// datagrams waiting for its reader was full (128 datagrams or 64 KiB).
	reasonReadQueueFull = "dtls_read_queue_full"
	// reasonFragmentsFull: a handshake record the connection's fragment
	// buffer had no room for (64 KiB of fragments held), or, once the
	// handshake is complete, with a fragment of a message that never comes.
	reasonFragmentsFull = "dtls_fragments_full"
)

// readDropped counts, and logs at most once per refusalLogEvery, a
// datagram a listener dropped because the connection it was for already
// had as many waiting for its reader as it may (pion-dtls patch (56)). A
// device's session reads its datagrams on the listener's read loop once
// established, so it is a handshake that is slow (a store lookup that
// waits) while its peer keeps sending, or a peer that sends far more than
// any device does. What a device needs it sends again (its flight, a
// confirmable request). It runs on the listener's read loop and must not
// block.
func (s *Server) readDropped(from netip.AddrPort, size int) {
	s.m.Refused.WithLabelValues(hub.CoAP, reasonReadQueueFull).Inc()
	s.refusalLine(reasonReadQueueFull, "coap: datagram dropped: its DTLS session's queue of datagrams waiting to be read is full (128 or 64 KiB); "+
		"a handshake waiting for the identity store while its peer keeps sending, or a peer flooding its session; the peer retransmits what it needs",
		"device", "", "remote", unmapped(from).String(), "size", size, "reason", reasonReadQueueFull)
}

// fragmentDropped counts, and logs at most once per refusalLogEvery, a
// handshake record a DTLS connection dropped because its fragment buffer
// held 64 KiB, or because the handshake is complete and the record holds
// a fragment of a message that never comes (pion-dtls patches (55),
// (60)). A device's certificate flight is a few KiB: a peer that goes
// past this sends fragments of messages that never come, or a
// certificate chain larger than any the gateway's CA issues, whose
// handshake then fails. It runs on the goroutine reading the connection,
// which may be the listener's read loop, and must not block.
func (s *Server) fragmentDropped(from netip.AddrPort, size int) {
	s.m.Refused.WithLabelValues(hub.CoAP, reasonFragmentsFull).Inc()
	s.refusalLine(reasonFragmentsFull, "coap: DTLS handshake record dropped: its session's buffer of handshake fragments is full (64 KiB), or its handshake is complete; "+
		"a peer sending fragments of handshake messages that never come, or a certificate chain over 64 KiB",
		"device", "", "remote", unmapped(from).String(), "size", size, "reason", reasonFragmentsFull)
}

// Addrs returns the bound addresses (certificate, PSK).
func (s *Server) Addrs() (cert, psk net.Addr) {
	if s.lnP != nil {
		psk = s.lnP.Addr()
	}
	return s.lnC.Addr(), psk
}

// Run serves until ctx ends, then closes the listeners and every session.
func (s *Server) Run(ctx context.Context) error {
	lns := []*limitListener{s.lnC}
	if s.lnP != nil {
		lns = append(lns, s.lnP)
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		ln.guard.start()
		// otacache.ServeDTLS: no goroutine of ours per session, answers
		// inline, bounded response cache (ota-cache/README.md).
		go func() { errc <- s.serve(ctx, ln) }()
	}
	swept := make(chan struct{})
	go func() { defer close(swept); s.sweepCerts(ctx) }()
	s.log.Info("coap: listening", "cert", s.lnC.Addr(), "psk", addrOrNone(s.lnP))
	<-ctx.Done()
	close(s.stop)
	for _, ln := range lns {
		ln.Close()
	}
	<-swept // before closing.Wait: the sweep adds to closing
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	var first error
	for range lns {
		if err := <-errc; err != nil && !errors.Is(err, net.ErrClosed) && first == nil {
			first = err
		}
	}
	s.closing.Wait()
	s.bg.Wait()
	s.watches.stopAll()
	s.deadline.Stop()
	return first
}

func addrOrNone(l *limitListener) string {
	if l == nil {
		return "off"
	}
	return l.Addr().String()
}

// onNewConn runs after a successful handshake: it learns the device from
// the DTLS state and registers the session for revocation.
func (s *Server) onNewConn(cc *otacache.DTLSConn) {
	dc := dtlsConnOf(cc.NetConn())
	if dc == nil {
		cc.Close()
		return
	}
	// Only who the peer is: PeerIdentity, not a clone of pion's whole
	// State (ConnectionState).
	hint, certs, ok := dc.PeerIdentity()
	if !ok {
		cc.Close()
		return
	}
	st := peerIdentity{IdentityHint: hint, PeerCertificates: certs}
	mode := "psk"
	if len(st.PeerCertificates) > 0 {
		mode = "cert"
	}
	// The credentials are checked again unless the PSK callback's answer
	// is at hand, and again after any revocation since that check.
	var dev string
	var gen uint64
	var err error
	if mode == "psk" {
		s.pskMu.Lock()
		a, ok := s.pskSeen[string(st.IdentityHint)]
		if a.n--; a.n <= 0 {
			delete(s.pskSeen, string(st.IdentityHint))
		} else {
			s.pskSeen[string(st.IdentityHint)] = a
		}
		s.pskMu.Unlock()
		dev, gen = a.device, a.gen
		if !ok {
			dev, gen, err = s.check(st)
		}
	} else {
		dev, gen, err = s.check(st)
	}
	var cert *hub.SessionCert
	var se *session
	var oldest []*otacache.DTLSConn
	var evicted enrollSession // an enrollment session closed for this one
	var evictedBy string
	for err == nil && dev != "" {
		info := s.classify(dev, st)
		if mode == "cert" {
			// What the sweep needs to end the session with its certificate
			// (certsweep.go), from the chain classify parsed; the
			// handshake's check parsed the leaf already, so it is there.
			if len(info.peer) == 0 {
				err = errors.New("the session's certificate cannot be parsed")
				break
			}
			cert = hub.NewSessionCert(info.peer[0])
		}
		s.mu.Lock()
		if s.revGen == gen {
			se = &session{device: dev, mode: mode, cc: cc, cert: cert, enroll: info}
			cc.SetValue(se)
			s.nSession++
			l := append(s.byDevice[dev], cc)
			if over := len(l) - maxSessionsPerDevice; over > 0 {
				// Every session past the bound, taken out of byDevice here,
				// under mu: their OnClose, which would also take them out,
				// runs later (pion's close, then its reader). Left in, they
				// were still counted and still the oldest, so handshakes of
				// the device finishing meanwhile all closed the same one
				// and the list grew past the bound.
				oldest = slices.Clone(l[:over])
				l = slices.Delete(l, 0, over)
				for _, old := range oldest {
					s.enrolling.forget(old)
				}
			}
			s.byDevice[dev] = l
			if info.kind != KindDevice {
				if old, by, ok := s.enrolling.add(enrollSession{cc: cc, device: dev, src: bridges.SourceOf(cc.RemoteAddr())}); ok && s.takeOutLocked(old.device, old.cc) {
					evicted, evictedBy = old, by
				}
			}
			s.mu.Unlock()
			break
		}
		s.mu.Unlock()
		dev, gen, err = s.check(st)
	}
	for _, old := range oldest {
		s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonSessionTakenOver).Inc()
		s.log.Info("coap: oldest session of the device closed: it opened more than "+strconv.Itoa(maxSessionsPerDevice),
			"device", dev, "old_remote", old.RemoteAddr().String(), "remote", cc.RemoteAddr().String())
		old.Close()
	}
	if evicted.cc != nil {
		s.endEnrollSession(evicted, evictedBy, cc)
	}
	if se == nil {
		// The credentials the handshake accepted are refused now: revoked
		// since, or not checked again (clock, store, pairing window).
		if err == nil {
			err = errors.New("the credentials name no device")
		}
		reason := credentialRefusal(err, mode == "cert")
		s.log.Warn("coap: session refused after handshake", "device", dev, "mode", mode, "reason", reason, "err", ratelog.ClipErr(err))
		s.m.Refused.WithLabelValues(hub.CoAP, reason).Inc()
		cc.Close()
		return
	}
	s.m.Sessions.WithLabelValues(hub.CoAP).Inc()
	s.m.Handshakes.WithLabelValues(hub.CoAP, "ok").Inc()
	if s.log.Enabled(context.Background(), slog.LevelDebug) { // its arguments are allocated even when dropped
		s.log.Debug("coap: device session open", "device", dev, "mode", mode, "remote", cc.RemoteAddr())
	}
	cc.AddOnClose(func() {
		s.mu.Lock()
		s.nSession--
		// cc may be gone from byDevice already (taken out by whoever
		// ended it: takeOutLocked): then nothing changes here.
		s.takeOutLocked(dev, cc)
		s.mu.Unlock()
		se.closeObservations()
		s.m.Sessions.WithLabelValues(hub.CoAP).Dec()
	})
}

// credentialRefusal is the refusal reason for err, an Identity's error
// for a device's certificate (cert) or PSK identity: a certificate retired
// by a renewal (refused as revoked, and said to be retired), revoked, the
// clock not set, an enrollment the pairing service refused, a lookup that
// failed, and otherwise what is wrong with the certificate, or an unknown
// PSK identity.
func credentialRefusal(err error, cert bool) string {
	if cert {
		return hub.CertRefusal(err)
	}
	switch {
	case errors.Is(err, pki.ErrRevoked):
		return hub.ReasonRevoked
	case errors.Is(err, pki.ErrClockNotSet):
		return hub.ReasonClockNotSet
	case errors.Is(err, bridges.ErrPairingRefused):
		return hub.ReasonPairingRefused
	case errors.Is(err, bridges.ErrLookup):
		return hub.ReasonIdentityError
	}
	return hub.ReasonUnknownPSK
}

// peerIdentity is who the peer of a DTLS session is: its PSK identity or
// its certificate chain (pion's State.IdentityHint and PeerCertificates).
type peerIdentity struct {
	IdentityHint     []byte
	PeerCertificates [][]byte
}

// check looks the session's credentials up again: the device they belong
// to now, and revGen from before the lookup.
func (s *Server) check(st peerIdentity) (dev string, gen uint64, err error) {
	gen = s.revocations()
	if len(st.PeerCertificates) > 0 {
		dev, err = s.id.VerifyCert(st.PeerCertificates)
	} else {
		dev, _, err = s.id.PSK(st.IdentityHint)
	}
	return dev, gen, err
}

func (s *Server) revocations() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revGen
}

// sessionOf is the session onNewConn bound to cc, nil if none was (the
// device was refused after the handshake).
func (s *Server) sessionOf(cc *otacache.DTLSConn) *session {
	se, _ := cc.Value().(*session)
	return se
}

func (s *Server) deviceOf(cc *otacache.DTLSConn) string {
	if se := s.sessionOf(cc); se != nil {
		return se.device
	}
	return ""
}

// revoke closes every session of a revoked device, each counted as
// revoked. It must not block (it runs inside the revocation call), so the
// closing happens on a goroutine of its own (closeLater); the sessions are
// marked ended first, under mu, so that none has a request served
// meanwhile (serveSession).
func (s *Server) revoke(device string) {
	s.mu.Lock()
	s.revGen++
	// All of them taken out at once (takeOutLocked's rule): a session the
	// sweep took out first is not here, and one taken here the sweep
	// finds gone.
	ccs := s.byDevice[device]
	delete(s.byDevice, device)
	for _, cc := range ccs {
		s.enrolling.forget(cc)
		if se := s.sessionOf(cc); se != nil {
			se.ended.Store(hub.ReasonRevoked)
		}
	}
	s.mu.Unlock()
	s.hub.Forget(device)
	if len(ccs) == 0 {
		return
	}
	s.m.Refused.WithLabelValues(hub.CoAP, hub.ReasonRevoked).Add(float64(len(ccs)))
	s.log.Info("coap: closing sessions of revoked device", "device", device, "sessions", len(ccs), "reason", hub.ReasonRevoked)
	s.closeLater(ccs)
}

// takeOutLocked takes cc out of device's sessions in byDevice, under s.mu,
// and reports whether it was there. Whoever ends a session (revoke, the
// certificate sweep, the takeover past maxSessionsPerDevice) takes it out
// first, at once rather than in its OnClose, which runs later (pion's
// close, then its reader), and counts and logs its end only if it did: a
// session leaves byDevice once, so its end is counted once when a
// revocation and the sweep get to it at the same moment, and a later
// sweep or takeover does not find it again.
func (s *Server) takeOutLocked(device string, cc *otacache.DTLSConn) bool {
	l := s.byDevice[device]
	i := slices.Index(l, cc)
	if i < 0 {
		return false
	}
	if l = slices.Delete(l, i, i+1); len(l) == 0 {
		delete(s.byDevice, device)
	} else {
		s.byDevice[device] = l
	}
	s.enrolling.forget(cc)
	return true
}

// closeLater closes ccs, taken out of byDevice, on a goroutine of its own,
// which Run waits for: revoke runs inside the revocation call and the
// sweep on its own loop, and neither may wait for a close (it writes the
// close_notify).
func (s *Server) closeLater(ccs []*otacache.DTLSConn) {
	if len(ccs) == 0 {
		return
	}
	s.closing.Add(1)
	s.closeAdded(ccs, 0)
}

// closeAdded closes ccs, for which the caller added one to closing, on a
// goroutine of its own after grace, or sooner if Run's context ends.
func (s *Server) closeAdded(ccs []*otacache.DTLSConn, grace time.Duration) {
	go func() {
		defer s.closing.Done()
		if grace > 0 {
			t := time.NewTimer(grace)
			select {
			case <-t.C:
			case <-s.stop:
			}
			t.Stop()
		}
		if f := s.closeHook.Load(); f != nil {
			(*f)()
		}
		for _, cc := range ccs {
			cc.Close()
		}
	}()
}

// SessionCount returns how many device sessions are open now.
func (s *Server) SessionCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nSession
}

// maxSessionsPerDevice bounds one device's open DTLS sessions; a new one
// past it closes the device's oldest. A device that reboots or loses its
// session state starts a new handshake while the old session lingers
// until the idle timeout (10 min): one rebooting every 10 s would hold 60
// sessions, and any device with valid credentials could open thousands.
// Eight leaves room for a device that fetches firmware on a second session
// while its first one observes commands, and for quick reconnects whose
// old session's close_notify is still on its way.
const maxSessionsPerDevice = 8

// Sessions returns how many sessions device has open now.
func (s *Server) Sessions(device string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byDevice[device])
}

func dtlsConnOf(c net.Conn) *piondtls.Conn {
	switch v := c.(type) {
	case *piondtls.Conn:
		return v
	case *handshakeConn:
		return v.Conn
	}
	return nil
}

package hub

import (
	"errors"
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// Refusal reasons, the values of the reason label. Each has a log line with
// the device (when known) where it is counted.
const (
	ReasonWrongCA          = "wrong_ca"
	ReasonExpired          = "cert_expired"
	ReasonBadCert          = "bad_certificate"
	ReasonRevoked          = "revoked"
	ReasonUnknownPSK       = "unknown_psk_identity"
	ReasonClientID         = "client_id_mismatch"
	ReasonNoCredentials    = "no_credentials"
	ReasonBadSecret        = "bad_secret"
	ReasonBusy             = "busy"
	ReasonPublishACL       = "publish_outside_namespace"
	ReasonSubscribeACL     = "subscribe_outside_namespace"
	ReasonTooLarge         = "payload_too_large"
	ReasonPlaintext        = "plaintext"
	ReasonBadRequest       = "bad_request"
	ReasonQueueFull        = "queue_full"
	ReasonHandshakeLimit   = "handshake_limit"
	ReasonHandshakeFailed  = "handshake_failed"
	ReasonSessionTakenOver = "session_taken_over"
	ReasonRetainedLimit    = "retained_limit"
	ReasonTopicAlias       = "topic_alias"
	// ReasonQoS: an MQTT PUBLISH with QoS 2; the gateway takes QoS 0 and 1.
	ReasonQoS = "qos_not_supported"
	// ReasonObserveLimit: a CoAP observe registration past the session's
	// bound, answered as a plain GET (RFC 7641 §4.1).
	ReasonObserveLimit = "observe_limit"
	// ReasonSubscriptionsLimit: an MQTT filter over the device's
	// subscription quota (mqtt.Config.MaxSubscriptions).
	ReasonSubscriptionsLimit = "subscriptions_limit"
	// ReasonSecretLockout: a secret login from a source address, or an
	// IPv6 /64, that failed too often lately, refused without checking
	// the secret.
	ReasonSecretLockout = "secret_lockout"
	// ReasonCommandsFull: a command not kept as its topic's last command
	// (transport="gateway"): the device already has maxLastPerDevice
	// topics kept, or all devices' kept commands reach maxLastBytes.
	ReasonCommandsFull = "commands_full"
	// ReasonCommandsHeld: a command (any message to a device's MQTT
	// session) the broker did not take for the session: it held as many
	// undelivered or unacknowledged messages as it may (mqtt.Config
	// MaxInflight, MaxHeldBytes; its write queue), or all sessions
	// together held MaxHeldBytesTotal.
	ReasonCommandsHeld = "commands_held"
	// ReasonCommandsEvicted: a command held for a disconnected MQTT
	// session, dropped to make room within mqtt.Config.MaxHeldBytesTotal
	// for a newer one (the session disconnected longest first).
	ReasonCommandsEvicted = "commands_evicted"
	// ReasonTopicRefused: telemetry the Sink will never take on its topic
	// (bridges.ErrTopicRefused: beyond the upstream link's topic limits);
	// sending it again cannot succeed.
	ReasonTopicRefused = "topic_refused"
	// ReasonCommitTimeout: telemetry the Sink admitted but had not made
	// durable by the wait's deadline (a slow disk); the device was asked
	// to retry, as for a full queue.
	ReasonCommitTimeout = "commit_timeout"
	// ReasonDiskError: telemetry the Sink could not store (a write or
	// fsync failed, or the queue is stopped after one): a fault of the
	// gateway's disk, not of the device or the link.
	ReasonDiskError = "disk_error"
	// ReasonClockNotSet: credentials not checked because the gateway's
	// clock is not set (pki.ErrClockNotSet): fix its time (NTP).
	ReasonClockNotSet = "clock_not_set"
	// ReasonPairingRefused: an enrollment session the pairing service did
	// not admit (bridges.ErrPairingRefused: no pairing window, no
	// completed setup-code exchange); its pairing events say which.
	ReasonPairingRefused = "pairing_refused"
	// ReasonIdentityError: credentials that could not be checked
	// (bridges.ErrLookup: the store failed), not the device's fault.
	ReasonIdentityError = "identity_error"
	// ReasonNoSession: a CoAP request on a DTLS session the gateway
	// refused after its handshake (answered 4.01 while the session
	// closes); the session's refusal is counted under its own reason.
	ReasonNoSession = "no_session"
	// ReasonObserveBacklog: a command not notified to a CoAP observer
	// because more than maxHeld came for one registration while its
	// answer was being written (the oldest held is dropped).
	ReasonObserveBacklog = "observe_backlog"
	// ReasonCertRetired: a certificate replaced by a renewal
	// (pki.ErrCertRetired), refused at a handshake or CONNECT
	// (CertRefusal), or its session closed (certsession.go); an expired
	// one's is closed as ReasonExpired, a revoked serial's as
	// ReasonRevoked.
	ReasonCertRetired = "cert_retired"
	// ReasonConnectTooLarge: an MQTT connection whose first packet (its
	// CONNECT, read before the device is authenticated) was larger than
	// a CONNECT with the largest Will payload allowed may be; closed
	// before the packet was read.
	ReasonConnectTooLarge = "connect_too_large"
	// ReasonPairingClosed: an enrollment session (the setup-code exchange
	// or enrollment) ended because the pairing window that admitted it
	// closed.
	ReasonPairingClosed = "pairing_window_closed"
	// ReasonRetainedRate: an MQTT retained publish or Will past its
	// device's rate of retained writes to the store
	// (mqtt.Config.RetainedBurst, RetainedEvery).
	ReasonRetainedRate = "retained_rate"
)

// Metrics are the transports' counters, registered once on the gateway's
// registry.
type Metrics struct {
	Refused    *prometheus.CounterVec // transport, reason
	Messages   *prometheus.CounterVec // transport, kind
	Sessions   *prometheus.GaugeVec   // transport
	Handshakes *prometheus.CounterVec // transport, result
	Observers  prometheus.Gauge
	// Dropped counts datagrams a transport did not send because its
	// socket had no room for them (transport; CoAP, whose listener never
	// waits for room: bridges/README.md).
	Dropped *prometheus.CounterVec

	telemetry sync.Map // transport → Messages{transport, "telemetry"}
}

// telemetryCounter returns Messages{origin, "telemetry"}, looked up once
// per transport: hashing the label values on every message was a few per
// cent of the MQTT server's CPU under load.
func (m *Metrics) telemetryCounter(origin string) prometheus.Counter {
	if c, ok := m.telemetry.Load(origin); ok {
		return c.(prometheus.Counter)
	}
	c := m.Messages.WithLabelValues(origin, "telemetry")
	m.telemetry.Store(origin, c)
	return c
}

func newMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_transport_refusals_total",
			Help: "Connections, requests and messages refused by the device transports, by reason.",
		}, []string{"transport", "reason"}),
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_transport_messages_total",
			Help: "Messages accepted from devices (telemetry) and delivered to them (command).",
		}, []string{"transport", "kind"}),
		Sessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "bastion_transport_sessions",
			Help: "Authenticated device sessions open now.",
		}, []string{"transport"}),
		Handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_transport_handshakes_total",
			Help: "TLS/DTLS handshakes, by result (ok, failed).",
		}, []string{"transport", "result"}),
		Observers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bastion_coap_observers",
			Help: "CoAP Observe registrations for commands.",
		}),
		Dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_transport_datagrams_dropped_total",
			Help: "Datagrams not sent because the socket's send buffer was full (dropped instead of waiting; DTLS and confirmable CoAP retransmit).",
		}, []string{"transport"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.Refused, m.Messages, m.Sessions, m.Handshakes, m.Observers, m.Dropped} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("hub metrics: registered twice on one registry: %w", err)
			}
			return nil, fmt.Errorf("hub metrics: %w", err)
		}
	}
	return m, nil
}

package mqtt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/pki"
)

type authHook struct {
	mochi.HookBase
	s *Server
}

func (h *authHook) ID() string { return "bastion-auth" }

func (h *authHook) Provides(b byte) bool {
	return authEvents[b]
}

var authEvents = hookEvents(mochi.OnConnect, mochi.OnConnectAuthenticate, mochi.OnACLCheck,
	mochi.OnPublish, mochi.OnSessionEstablished, mochi.OnDisconnect, mochi.OnWill, mochi.OnSubscribed,
	mochi.OnPacketRead, mochi.OnPublishDropped)

// OnConnect caps the keepalive so that a dead device's session ends.
func (h *authHook) OnConnect(cl *mochi.Client, pk packets.Packet) error {
	if ka := cl.State.Keepalive; ka == 0 || ka > h.s.cfg.MaxKeepalive {
		cl.State.Keepalive = h.s.cfg.MaxKeepalive
		cl.State.ServerKeepalive = true
	}
	return nil
}

// OnConnectAuthenticate binds the MQTT client id to the proven identity.
func (h *authHook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	clientID := ratelog.Clip(cl.ID, ratelog.MaxText)
	log := h.s.log.With("remote", cl.Net.Remote, "client_id", clientID)
	// refuse counts a refusal under reason and logs it through
	// refusalLine, one line per reason per interval: anyone who reaches
	// the port can have a CONNECT refused (with allow_secret_auth without
	// a certificate) as fast as they can send them, with a client id and a
	// user name of up to 64 KiB each. Every text in args is cut (a user
	// name, a Will topic, an error quoting them).
	refuse := func(reason, msg string, args ...any) bool {
		h.s.m.Refused.WithLabelValues(hub.MQTT, reason).Inc()
		h.s.refusalLine(slog.LevelWarn, "connect:"+reason, "mqtt: connect refused: "+msg,
			append([]any{"remote", cl.Net.Remote, "client_id", clientID, "reason", reason}, clipped(args)...)...)
		return false
	}
	// refuseDevice is refuse for a CONNECT whose credentials proved
	// device dev (a client id not the device's, a Will outside its
	// namespace, a revocation during the check): only a holder of the
	// device's credentials gets here, each time a TLS handshake and a
	// check, so each is logged, its text cut all the same.
	refuseDevice := func(dev, reason, msg string, args ...any) bool {
		h.s.m.Refused.WithLabelValues(hub.MQTT, reason).Inc()
		log.Warn("mqtt: connect refused: "+msg, append([]any{"device", dev, "reason", reason}, clipped(args)...)...)
		return false
	}
	// Registered before the credentials are looked at: a revocation of
	// the device from now on either closes the session or has the
	// credentials checked again before it is accepted (accept below).
	pc, _ := cl.Net.Conn.(*pipeConn)
	if pc != nil {
		h.s.register(pc, cl)
	}
	dev, leaf, err := deviceOf(h.s.id, cl)
	var cert *hub.SessionCert
	var secretFrom *bridges.Source // a secret login's source, proven once accepted
	switch {
	case err != nil:
		return refuse(hub.CertRefusal(err), "certificate not accepted", "device", dev, "err", err)
	case leaf != nil:
		// What the sweep needs to end the session with its certificate
		// (certsweep.go).
		cert = hub.NewSessionCert(leaf)
	case h.s.cfg.AllowSecretAuth && len(pk.Connect.Username) > 0:
		dev = string(pk.Connect.Username)
		src := bridges.SourceOf(cl.Net.Conn.RemoteAddr())
		now := h.s.cfg.Now()
		if until, byPrefix := h.s.secrets.gated(now, src, dev); !until.IsZero() {
			wait := until.Sub(now).Round(time.Second)
			what, args := "from this address", []any{"device", dev, "retry_in", wait}
			if byPrefix {
				what, args = "from this address's IPv6 /64", append(args, "prefix", src.Prefix.String())
			}
			refuse(hub.ReasonSecretLockout, "secret login not checked: too many failed secret logins "+what+" lately", args...)
			h.refuseConnect(cl, packets.ErrConnectionRateExceeded, packets.Err3ServerUnavailable, "too many failed logins "+what+": retry in "+wait.String())
			return false
		}
		if err := h.s.id.CheckSecret(dev, pk.Connect.Password); err != nil {
			if errors.Is(err, bridges.ErrBusy) {
				// Not a wrong secret: "server busy" (3.1.1: server
				// unavailable) tells the device to try again, where
				// "bad user name or password" may stop it for good.
				refuse(hub.ReasonBusy, "secret login not checked: too many at once; the device should retry", "device", dev, "err", err)
				h.refuseConnect(cl, packets.ErrServerBusy, packets.Err3ServerUnavailable, "busy: retry in a few seconds")
				return false
			}
			if errors.Is(err, pki.ErrRevoked) {
				return refuse(hub.ReasonRevoked, "secret login failed", "device", dev, "err", err)
			}
			h.s.secrets.failed(now, src)
			return refuse(hub.ReasonBadSecret, "secret login failed", "device", dev, "err", err)
		}
		// Not proven yet (secretLimit.succeeded): only once accepted, past
		// the client id, the Will and a revocation meanwhile.
		secretFrom = &src
	default:
		return refuse(hub.ReasonNoCredentials, "no client certificate", "device", "")
	}
	if cl.ID != dev {
		return refuseDevice(dev, hub.ReasonClientID, "client id is not the authenticated device; use the device id as client id")
	}
	if pk.Connect.WillFlag {
		will := mochi.Will{TopicName: pk.Connect.WillTopic, Payload: pk.Connect.WillPayload, Retain: pk.Connect.WillRetain,
			User: pk.Connect.WillProperties.User}
		if reason, msg, size, limit := h.s.willRefusal(dev, will); reason != "" {
			refuseDevice(dev, reason, "Will refused: "+msg, "will_topic", ratelog.Clip(pk.Connect.WillTopic, maxLoggedTopic),
				"will_size", size, "limit", limit, "allowed", bridges.TopicPrefix(dev)+"t/... or s/...")
			h.refuseConnect(cl, packets.ErrNotAuthorized, packets.Err3NotAuthorized, "will "+msg)
			return false
		}
		// mochi would hold a delayed Will back after the connection ends
		// while the Sink (OnWill) has it at once, and drop it if the device
		// comes back in time: the upstream would see a Will the local
		// subscribers never do. The Will goes out when the connection ends.
		cl.Properties.Will.WillDelayInterval = 0
	}
	older, verdict := h.s.accept(pc, cl, cert, secretFrom)
	for verdict == acceptRevoked {
		// Refused here, before the CONNACK: accepted, the session would
		// get a success CONNACK and the messages queued for the device
		// before a check after it closed the session. Only a revocation of
		// this device gets here (not any device's, which had every
		// CONNECT under way checked again), and the gateway's identity
		// refuses a revoked device before its secret's argon2id runs.
		reason, err := h.s.recheck(cl, pk)
		if errors.Is(err, bridges.ErrBusy) {
			refuseDevice(dev, reason, "secret login not checked again after a revocation: too many at once; the device should retry", "err", err)
			h.refuseConnect(cl, packets.ErrServerBusy, packets.Err3ServerUnavailable, "busy: retry in a few seconds")
			return false
		}
		if err != nil {
			return refuseDevice(dev, reason, "credentials no longer accepted: the device was revoked while it connected", "err", err)
		}
		older, verdict = h.s.accept(pc, cl, cert, secretFrom)
	}
	if verdict == acceptEvicted {
		// Closed by the limits of unauthenticated connections while its
		// credentials were checked: counted and logged there
		// (handshake_limit). No CONNACK can reach it.
		log.Debug("mqtt: connect not accepted: the connection was closed during its check to make room for a newer one", "device", dev)
		return false
	}
	if verdict == acceptSuperseded {
		// This CONNECT's check (a secret's argon2id) ended after a newer
		// CONNECT of the device was accepted: the newer one is the
		// device's session, and this one is most likely a connection the
		// device has given up. MQTT 5 has no CONNACK code for a session
		// taken over (0x8E is a DISCONNECT code [MQTT-3.2.2-8]).
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonSessionTakenOver).Inc()
		log.Info("mqtt: connect refused: a newer connection of the device was accepted while this one's credentials were checked (one session per device)",
			"device", dev, "reason", hub.ReasonSessionTakenOver)
		h.refuseConnect(cl, packets.ErrUnspecifiedError, packets.Err3ServerUnavailable, "session taken over: a newer connection of this client id was accepted first")
		return false
	}
	for _, old := range older {
		// Every other session of the device, not only the one mochi's
		// takeover finds in Clients, which may be none of them (two
		// CONNECTs at once). Ended here, mochi's DisconnectClient finds
		// the one it takes over closed instead of waiting for a write to
		// an old connection the device no longer reads.
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonSessionTakenOver).Inc()
		log.Info("mqtt: older session closed: the device connected again (one session per device)", "device", dev, "old_remote", old.Net.Remote)
		h.s.endSession(old, packets.ErrSessionTakenOver, time.Now().Add(endWait))
	}
	if pc != nil {
		pc.identify(dev) // its slot was given back in accept
	}
	log.Info("mqtt: device connected", "device", dev)
	return true
}

// refuseConnect answers a CONNECT whose credentials are fine with code
// (MQTT 3.1.1: v3) and closes the connection. mochi answers every refusal
// of OnConnectAuthenticate with MQTT 5's 0x86 bad user name or password
// (3.1.1: 0x05 not authorised), which would send whoever reads the
// device's log to look at credentials that are not the problem; its own
// CONNACK then finds the connection closed and is not sent.
func (h *authHook) refuseConnect(cl *mochi.Client, code, v3 packets.Code, why string) {
	ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code.Code,
		Properties: packets.Properties{ReasonString: why}}
	if cl.Properties.ProtocolVersion < 5 {
		ack.ReasonCode = v3.Code
	}
	if err := cl.WritePacket(ack); err != nil {
		h.s.log.Debug("mqtt: refusing CONNACK not sent", "device", ratelog.Clip(cl.ID, ratelog.MaxText), "err", err)
	}
	cl.Stop(code)
}

// clipped is args (key, value pairs for a log line) with every text value
// cut after ratelog.MaxText bytes (ratelog.Clip), an error as its cut text
// (ratelog.ClipErr): for the lines of refused CONNECTs, whose text the peer
// chose.
func clipped(args []any) []any {
	out := make([]any, len(args))
	for i, a := range args {
		switch v := a.(type) {
		case string:
			a = ratelog.Clip(v, ratelog.MaxText)
		case error:
			a = ratelog.ClipErr(v)
		}
		out[i] = a
	}
	return out
}

// OnPacketRead caps the session expiry interval of a DISCONNECT (see
// capSessionExpiry), and ends the session of a device that sends a QoS 2 PUBLISH
// (MQTT 5: DISCONNECT 0x9B QoS not supported; 3.1.1: the connection is
// closed, the one refusal 3.1.1 allows besides the QoS 2 exchange). The
// gateway takes QoS 0 and 1. mochi lowered QoS 2 to the Maximum QoS (1)
// before OnPublish and answered with a PUBACK, which a QoS 2 sender does
// not take as an answer: it kept the message and resent it after every
// reconnect. Only this hook sees the QoS the device sent.
func (h *authHook) OnPacketRead(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.FixedHeader.Type == packets.Disconnect {
		h.capSessionExpiry(cl, &pk)
		return pk, nil
	}
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Qos < 2 {
		return pk, nil
	}
	h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonQoS).Inc()
	h.s.log.Warn("mqtt: session closed: the device published with QoS 2; this gateway takes QoS 0 and 1, publish with QoS 1",
		"device", cl.ID, "topic", ratelog.Clip(pk.TopicName, maxLoggedTopic), "reason", hub.ReasonQoS)
	h.s.endSession(cl, packets.ErrQosNotSupported, time.Now().Add(endWait))
	return pk, packets.ErrRejectPacket // ends mochi's read loop
}

// capSessionExpiry caps the session expiry interval a DISCONNECT sets
// (MQTT 5) at SessionExpiry, as mochi's CONNACK caps the CONNECT's. mochi
// kept the DISCONNECT's as sent: a device could keep its session, its
// subscriptions and the messages queued for it for up to 136 years
// (0xFFFFFFFF s). A session whose CONNECT had none (0) is left alone:
// a non-zero one in its DISCONNECT is a protocol error (MQTT 5
// §3.14.2.2.2), which mochi answers (DISCONNECT 0x82) only if it sees it,
// also when SessionExpiry is below a second and the cap 0.
func (h *authHook) capSessionExpiry(cl *mochi.Client, pk *packets.Packet) {
	limit := h.s.mq.Options.Capabilities.MaximumSessionExpiryInterval
	p := &pk.Properties
	if !p.SessionExpiryIntervalFlag || p.SessionExpiryInterval <= limit || cl.Properties.Props.SessionExpiryInterval == 0 {
		return
	}
	h.s.log.Debug("mqtt: session expiry of DISCONNECT capped", "device", cl.ID, "asked_s", p.SessionExpiryInterval, "limit_s", limit)
	p.SessionExpiryInterval = limit
}

// OnSessionEstablished runs once mochi has sent the CONNACK: from then on
// the session may be ended with a DISCONNECT. Revocation finds the
// session through conns since its credential check (OnConnectAuthenticate).
func (h *authHook) OnSessionEstablished(cl *mochi.Client, pk packets.Packet) {
	if pc, ok := cl.Net.Conn.(*pipeConn); ok {
		pc.connacked.Store(true)
	}
	h.s.mu.Lock()
	h.s.authed[cl] = cl.ID
	h.s.mu.Unlock()
	h.s.m.Sessions.WithLabelValues(hub.MQTT).Inc()
	h.s.m.Handshakes.WithLabelValues(hub.MQTT, "ok").Inc()
}

func (h *authHook) OnDisconnect(cl *mochi.Client, err error, expire bool) {
	if errors.Is(err, packets.ErrTopicAliasInvalid) {
		// mochi refused the PUBLISH itself (Topic Alias Maximum 0), before
		// any hook; counted here, where the session's end reports why.
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonTopicAlias).Inc()
		h.s.log.Warn("mqtt: session closed: the device used a topic alias; this gateway allows none, publish with the topic name",
			"device", cl.ID, "reason", hub.ReasonTopicAlias)
	}
	if code := (packets.Code{}); errors.As(err, &code) && code.Code == packets.ErrMalformedPacket.Code {
		// mochi ended the session on a packet it could not decode (a
		// remaining length of five bytes, mochi patch (16), a bad
		// string, ...); a device in a loop reconnects and sends it again,
		// so its line is spaced.
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonBadRequest).Inc()
		h.s.deviceLine(slog.LevelWarn, hub.ReasonBadRequest, cl.ID, "mqtt: session closed: the device sent a malformed packet",
			"reason", hub.ReasonBadRequest, "err", ratelog.ClipErr(err))
	}
	h.s.mu.Lock()
	_, ok := h.s.authed[cl]
	delete(h.s.authed, cl)
	h.s.mu.Unlock()
	if !ok {
		return
	}
	h.s.m.Sessions.WithLabelValues(hub.MQTT).Dec()
}

// OnACLCheck keeps a device inside its namespace. The broker asks for every
// publish (write), every subscription filter and every delivery (read).
func (h *authHook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	if write {
		if hub.MayPublish(cl.ID, topic) {
			return true
		}
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonPublishACL).Inc()
		h.s.deviceLine(slog.LevelWarn, "publish_acl", cl.ID, "mqtt: publish refused: topic outside the device namespace", "topic", ratelog.Clip(topic, maxLoggedTopic),
			"allowed", bridges.TopicPrefix(cl.ID)+"t/... or s/...")
		return false
	}
	if hub.MaySubscribe(cl.ID, topic) || hub.MayRead(cl.ID, topic) {
		return true
	}
	h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonSubscribeACL).Inc()
	h.s.deviceLine(slog.LevelWarn, "subscribe_acl", cl.ID, "mqtt: subscribe refused: "+filterRefusal(cl.ID, topic), "filter", ratelog.Clip(topic, maxLoggedTopic), "filter_bytes", len(topic),
		"allowed", bridges.TopicPrefix(cl.ID)+"c/# or "+hub.BroadcastPrefix+"#")
	return false
}

// filterRefusal says why OnACLCheck refused filter, for its log line.
func filterRefusal(device, filter string) string {
	for _, root := range []string{bridges.TopicPrefix(device) + hub.ClassCommand + "/", hub.BroadcastPrefix} {
		if rest, ok := strings.CutPrefix(filter, root); ok && len(rest) > hub.MaxPathLen {
			return fmt.Sprintf("filter longer than %d bytes below %s; use a shorter filter or a wildcard", hub.MaxPathLen, root)
		}
	}
	return "filter outside the device namespace"
}

// maxLoggedTopic bounds a topic or filter a device sent in a log line
// (ratelog.Clip): one may be as long as a packet.
const maxLoggedTopic = 96

// OnWill treats a device's Will as a publish by the device at the moment
// its connection ends: the same namespace, payload limit, retained cap
// and retained rate, and the Sink before any local subscriber. mochi publishes (and retains)
// a Will without asking OnACLCheck or OnPublish, so CONNECT already refused
// a Will outside the namespace or too large, and this checks again in case
// anything else set one. mochi sends the Will this returns, and the
// original one if a hook returns an error: a Will is dropped by returning
// an empty one (no topic: mochi's subscriber scan matches nothing; not
// retained: nothing is stored).
func (h *authHook) OnWill(cl *mochi.Client, will mochi.Will) (mochi.Will, error) {
	if cl.Net.Inline {
		return will, nil
	}
	log := h.s.log.With("device", cl.ID, "topic", will.TopicName)
	if pc, ok := cl.Net.Conn.(*pipeConn); ok && pc.refused.Load() {
		log.Info("mqtt: Will not sent: the device's credentials are no longer accepted (revoked, or its certificate ended)")
		return mochi.Will{}, nil
	}
	if will.Retain && !h.s.keepRetained(will.TopicName, len(will.Payload)) {
		will.Retain = false // a privacy opt-out: sent, not kept
	}
	if reason, msg, size, limit := h.s.willRefusal(cl.ID, will); reason != "" {
		h.s.m.Refused.WithLabelValues(hub.MQTT, reason).Inc()
		log.Warn("mqtt: Will not sent: "+msg, "reason", reason, "size", size, "limit", limit)
		return mochi.Will{}, nil
	}
	if will.Retain {
		if reason := h.s.retainRefusal(cl.ID, will.TopicName, len(will.Payload)); reason != "" {
			h.s.refuseRetain(cl.ID, will.TopicName, "Will", reason)
			return mochi.Will{}, nil
		}
	}
	qos := min(will.Qos, 1)
	now := time.Now()
	m := bridges.Message{Device: cl.ID, Topic: will.TopicName, Payload: will.Payload, QoS: qos, Received: now}
	if err := h.s.hub.Telemetry(h.s.deadline.ForQoS(qos, now), hub.MQTT, m); err != nil {
		// As for a publish the Sink refused: no local subscriber gets it
		// either, and there is no device left to retry.
		log.Warn("mqtt: Will not sent: the Sink did not take it", "err", err)
		return mochi.Will{}, nil
	}
	return will, nil
}

// willRefusal says why device may not have will ("" if it may): the rules
// of a publish (sizeRefusal), for the message mochi makes of it (its topic,
// payload and user properties). The size and limit are for the log line:
// the payload's and MaxPayload, or those sizeRefusal found too large.
func (s *Server) willRefusal(device string, will mochi.Will) (reason, msg string, size, limit int) {
	if !hub.MayPublish(device, will.TopicName) {
		return hub.ReasonPublishACL, "topic outside the device namespace", len(will.Payload), s.cfg.MaxPayload
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Retain: will.Retain}, TopicName: will.TopicName, Payload: will.Payload,
		Properties: packets.Properties{User: will.User}}
	if what, size, limit := s.sizeRefusal(&pk); what != "" {
		return hub.ReasonTooLarge, what, size, limit
	}
	return "", "", 0, 0
}

// retainedAllowance is what a retained message may hold besides a
// payload of MaxPayload: its topic (at most 330 bytes: devices/, a 63-byte
// device id, /t/ and a 256-byte path) and some 700 bytes of properties (a
// content type, a few user properties).
const retainedAllowance = 1 << 10

// sizeRefusal says why a publish pk is too large ("" if it is not), with
// the size that is and its limit: a payload past MaxPayload; for a
// retained message, also its topic, payload and properties together
// (packets.Packet.HeldBytes) past MaxPayload + retainedAllowance. The
// broker keeps a retained message whole, properties included, in memory
// and in the store for as long as it is retained: bounded by its payload
// alone, a device could keep its MaxRetained topics at max_packet_size
// each (16 MiB with the largest max_packet_size), most of it user
// properties. A message not retained is not kept with its properties (the
// Sink takes its payload).
func (s *Server) sizeRefusal(pk *packets.Packet) (what string, size, limit int) {
	if len(pk.Payload) > s.cfg.MaxPayload {
		return "payload too large", len(pk.Payload), s.cfg.MaxPayload
	}
	if n := pk.HeldBytes(); pk.FixedHeader.Retain && n > s.cfg.MaxPayload+retainedAllowance {
		return "retained message too large (its topic, payload and properties together)", n, s.cfg.MaxPayload + retainedAllowance
	}
	return "", 0, 0
}

// OnPublish hands device telemetry to the Sink before the broker sends the
// PUBACK: a QoS 1 message is acknowledged only once it is accepted. A full
// queue is refused (MQTT 5: PUBACK 0x97; 3.1.1 has no negative PUBACK, so
// no PUBACK and the session is closed: the device resends after
// reconnecting).
//
// A QoS 1 message is not waited for here: once the Sink admitted it, the
// session's connection (pipeConn) holds the PUBACK mochi writes next until
// the message is durable, and mochi goes on reading the device's next
// packet. Refusals are decided here, synchronously, as before.
func (h *authHook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil // the gateway's own mirror of CoAP telemetry and commands
	}
	if pc, ok := cl.Net.Conn.(*pipeConn); ok && pc.refused.Load() {
		// Revoked: read before the connection closed, taken from no one.
		h.s.log.Debug("mqtt: publish of a revoked device dropped", "device", cl.ID, "topic", pk.TopicName)
		return pk, packets.ErrRejectPacket
	}
	if pk.FixedHeader.Retain && !h.s.keepRetained(pk.TopicName, len(pk.Payload)) {
		pk.FixedHeader.Retain = false // a privacy opt-out: taken, not kept
	}
	if what, size, limit := h.s.sizeRefusal(&pk); what != "" {
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonTooLarge).Inc()
		h.s.deviceLine(slog.LevelWarn, "too_large", cl.ID, "mqtt: publish refused: "+what, "topic", pk.TopicName, "size", size, "limit", limit)
		if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0 {
			return pk, packets.ErrPacketTooLarge
		}
		return pk, packets.ErrRejectPacket
	}
	if pk.FixedHeader.Retain {
		if reason := h.s.retainRefusal(cl.ID, pk.TopicName, len(pk.Payload)); reason != "" {
			return h.refuseRetained(cl, pk, reason)
		}
	}
	now := time.Now()
	ctx := h.s.deadline.ForQoS(pk.FixedHeader.Qos, now)
	m := bridges.Message{Device: cl.ID, Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Received: now}
	var err error
	if pc, ok := cl.Net.Conn.(*pipeConn); ok && m.QoS > 0 {
		err = h.pipelined(ctx, pc, m)
	} else {
		err = h.s.hub.Telemetry(ctx, hub.MQTT, m)
	}
	if err == nil {
		return pk, nil
	}
	if errors.Is(err, errSessionEnded) {
		// Closing anyway; the device sends it again after reconnecting.
		h.s.log.Debug("mqtt: publish during session end not acknowledged", "device", cl.ID, "topic", pk.TopicName)
		return pk, packets.ErrRejectPacket
	}
	v5 := cl.Properties.ProtocolVersion == 5
	if errors.Is(err, bridges.ErrTopicRefused) {
		// Sending it again cannot succeed: refused as a bad topic, not as
		// a full queue, and a 3.1.1 session is not closed for it (the
		// device would send it again after reconnecting), as for a payload
		// too large.
		h.s.deviceLine(slog.LevelWarn, "topic_refused", cl.ID, "mqtt: publish refused: the upstream link refuses its topic", "topic", pk.TopicName, "err", err)
		if v5 && pk.FixedHeader.Qos > 0 {
			return pk, packets.ErrTopicNameInvalid
		}
		return pk, packets.ErrRejectPacket
	}
	reason := hub.SinkRefusal(err) // counted by the hub
	full := reason == hub.ReasonQueueFull || reason == hub.ReasonCommitTimeout
	switch {
	case !v5 && pk.FixedHeader.Qos > 0:
		// MQTT 3.1.1 has no negative PUBACK, and its client sends an
		// unacknowledged PUBLISH again only when it reconnects
		// [MQTT-4.4.0-1]: left open, the session would keep the refused
		// message in the client's in-flight window for good (a few such
		// refusals and it can publish nothing at QoS 1) and would go on
		// taking the messages after it, ahead of it. So the session ends
		// here, before mochi reads another packet; PUBACKs still held for
		// messages before this one are dropped, and those are sent again
		// as duplicates. The device's Will is not published: the close
		// asks it to send again, it does not mean the device is gone (and
		// the queue that refused this would refuse the Will too).
		h.s.deviceLine(slog.LevelWarn, "refused_v4", cl.ID, "mqtt: publish refused; closing the MQTT 3.1.1 session so that the device sends it again after reconnecting (3.1.1 has no negative PUBACK)",
			"topic", pk.TopicName, "queue_full", full, "reason", reason, "err", err)
		h.s.endSession(cl, packets.ErrQuotaExceeded, time.Now())
	case reason == hub.ReasonCommitTimeout:
		h.s.deviceLine(slog.LevelWarn, reason, cl.ID, "mqtt: publish refused: not made durable within the commit deadline (slow disk), device asked to retry", "topic", pk.TopicName, "qos", pk.FixedHeader.Qos)
	case full:
		h.s.deviceLine(slog.LevelWarn, reason, cl.ID, "mqtt: publish refused: queue full, device asked to retry", "topic", pk.TopicName, "qos", pk.FixedHeader.Qos)
	default:
		h.s.log.Error("mqtt: publish not accepted", "device", cl.ID, "topic", pk.TopicName, "err", err)
	}
	if v5 && pk.FixedHeader.Qos > 0 {
		return pk, packets.ErrQuotaExceeded
	}
	return pk, packets.ErrRejectPacket
}

// refuseRetained refuses a retained publish whole, not only its
// retaining: a device that asked for a retained message must hear it was
// not kept. MQTT 5 QoS 1: PUBACK 0x97 quota exceeded; QoS 0: dropped.
// MQTT 3.1.1 QoS 1, which has no negative PUBACK: over the cap of topics
// it is dropped without a PUBACK (sending it again cannot succeed, as for
// a payload too large); over the rate the session is closed, as for a
// full queue (see OnPublish), so that the device sends it again after
// reconnecting, by when its bucket has refilled some.
func (h *authHook) refuseRetained(cl *mochi.Client, pk packets.Packet, reason string) (packets.Packet, error) {
	h.s.refuseRetain(cl.ID, pk.TopicName, "publish", reason)
	switch {
	case pk.FixedHeader.Qos == 0:
	case cl.Properties.ProtocolVersion == 5:
		return pk, packets.ErrQuotaExceeded
	case reason == hub.ReasonRetainedRate:
		h.s.endSession(cl, packets.ErrQuotaExceeded, time.Now())
	}
	return pk, packets.ErrRejectPacket
}

// pipelined admits a QoS 1 message without waiting for the disk and makes
// the session hold what mochi writes next (its PUBACK) until the Sink
// reports it durable. At most maxPipelined messages per session wait; the
// read loop waits here for room.
func (h *authHook) pipelined(ctx context.Context, pc *pipeConn, m bridges.Message) error {
	if err := pc.reserve(m.Device); err != nil {
		return err
	}
	pending, err := h.s.hub.TelemetryNotify(ctx, hub.MQTT, m, pc.report)
	if !pending {
		pc.unreserve()
	}
	return err
}

// OnSubscribed counts and logs the filters mochi refused for the
// subscription quota (mochi patch (9)): SUBACK 0x97, or 0x80 for MQTT
// 3.1.1, which also answers an invalid filter or one the ACL refused, so
// a refused filter counts here only if it is valid, in the device's
// namespace (OnACLCheck counts the others) and not held after the
// SUBSCRIBE. Not in OnACLCheck: mochi calls that for every message it
// delivers too, with the topic, not a filter.
func (h *authHook) OnSubscribed(cl *mochi.Client, pk packets.Packet, codes []byte) {
	for i, sub := range pk.Filters {
		if i >= len(codes) || codes[i] < packets.ErrUnspecifiedError.Code || !mochi.IsValidFilter(sub.Filter, false) ||
			!(hub.MaySubscribe(cl.ID, sub.Filter) || hub.MayRead(cl.ID, sub.Filter)) ||
			!mochi.OverSubscriptionQuota(cl, sub.Filter, h.s.cfg.MaxSubscriptions) {
			continue
		}
		h.s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonSubscriptionsLimit).Inc()
		h.s.deviceLine(slog.LevelWarn, "subscriptions_limit", cl.ID, "mqtt: subscribe refused: the device holds as many subscriptions as it may; unsubscribe first or use a wildcard",
			"filter", ratelog.Clip(sub.Filter, maxLoggedTopic), "limit", h.s.cfg.MaxSubscriptions)
	}
}

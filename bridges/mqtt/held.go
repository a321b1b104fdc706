package mqtt

import (
	"cmp"
	"log/slog"
	"slices"
	"strings"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/ratelog"
)

// Commands held for device sessions (mochi patch (17)). The broker copies a
// command for the session that subscribed to it and holds the copy until
// the device acknowledges it (QoS 1), also while the device is
// disconnected, for the hour its session is kept, or until it is written
// (QoS 0). Bounded only in number (MaxInflight, the write queue), that was
// 64 times the largest command for every device with a QoS 1 subscription
// that was offline or did not acknowledge, and the hub's bound on its last
// commands does not see these copies. Config.MaxHeldBytes bounds one
// session's, MaxHeldBytesTotal all of them.

// makeRoom makes room within MaxHeldBytesTotal for command m by dropping
// the commands held for disconnected sessions, the session disconnected
// longest first (its device is the least likely to come back for them),
// until m fits or no disconnected session holds any; nothing when m's
// device's session is full itself. Connected sessions
// keep theirs (they are being delivered, or the device reads and does not
// acknowledge, which MaxHeldBytes bounds): the broker then refuses m
// (OnPublishDropped). A disconnected device gets what it still holds when
// it reconnects; the hub keeps each topic's last command only for CoAP
// (bridges/README.md).
func (s *Server) makeRoom(m bridges.Message) {
	// With room for the subscription identifiers the broker gives the
	// copy, 8 bytes for each of the session's filters that match.
	need := mochi.HeldSize(&packets.Packet{TopicName: m.Topic, Payload: m.Payload}) + 8*int64(s.cfg.MaxSubscriptions)
	if s.mq.HeldBytes()+need <= s.cfg.MaxHeldBytesTotal {
		return
	}
	if cl, ok := s.mq.Clients.Get(m.Device); ok {
		if held := cl.HeldBytes(); cl.State.Inflight.Len() >= int(s.cfg.MaxInflight) || held > 0 && held+need > s.cfg.MaxHeldBytes {
			return // its session refuses m anyway: no room to make
		}
		if cl.Closed() && s.reachesAtQoS0(m) {
			// A disconnected session keeps no QoS 0 copy: dropping other
			// devices' held commands would make room for nothing.
			return
		}
	}
	s.roomMu.Lock()
	defer s.roomMu.Unlock()
	for _, c := range byDisconnect(s.mq.Clients.GetAll()) {
		if s.mq.HeldBytes()+need <= s.cfg.MaxHeldBytesTotal {
			return
		}
		n, size := c.cl.DropInflights()
		if n == 0 {
			continue // reconnected meanwhile: the new session has them
		}
		s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonCommandsEvicted).Add(float64(n))
		s.deviceLine(slog.LevelWarn, hub.ReasonCommandsEvicted, c.cl.ID,
			"mqtt: commands held for a disconnected device dropped to make room for newer commands: all sessions together hold as much as they may",
			"dropped", n, "dropped_bytes", size, "disconnected_at", time.Unix(c.stopped, 0).UTC(),
			"held_bytes_all", s.mq.HeldBytes(), "limit_bytes_all", s.cfg.MaxHeldBytesTotal)
	}
}

// reachesAtQoS0 reports whether command m would reach its device at QoS
// 0: m is QoS 0, or the device's subscription that matches it is (the
// broker sends at the lower of the two), or none matches.
func (s *Server) reachesAtQoS0(m bridges.Message) bool {
	if m.QoS == 0 {
		return true
	}
	sub, ok := s.mq.Topics.Subscribers(m.Topic).Subscriptions[m.Device]
	return !ok || sub.Qos == 0
}

// heldSession is a disconnected session that holds commands, and when its
// connection ended (whole seconds).
type heldSession struct {
	cl      *mochi.Client
	stopped int64
}

// byDisconnect returns the disconnected device sessions among clients
// that hold commands, the one disconnected longest first.
func byDisconnect(clients map[string]*mochi.Client) []heldSession {
	var out []heldSession
	for _, cl := range clients {
		if cl.Net.Inline || !cl.Closed() || cl.State.Inflight.Len() == 0 {
			continue
		}
		out = append(out, heldSession{cl: cl, stopped: cl.StopTime()})
	}
	sortHeld(out)
	return out
}

// sortHeld orders sessions by the time their connection ended, then by
// id (the time is in whole seconds).
func sortHeld(h []heldSession) {
	slices.SortFunc(h, func(a, b heldSession) int {
		return cmp.Or(cmp.Compare(a.stopped, b.stopped), strings.Compare(a.cl.ID, b.cl.ID))
	})
}

// OnPublishDropped counts and logs a message the broker did not take for
// a device's session (mochi patch (17)): a command while the session held
// MaxInflight messages or MaxHeldBytes, or all sessions MaxHeldBytesTotal
// (after makeRoom), or its write queue was full. The command is lost for
// that session (mirror reports it not taken; the upstream counts it
// no_receiver unless a CoAP observer got it). Spaced per device: commands
// come at the rate the cloud sends them.
func (h *authHook) OnPublishDropped(cl *mochi.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	s := h.s
	s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonCommandsHeld).Inc()
	msg := "mqtt: command not taken for the device's session: it holds as many undelivered commands as it may; the device must read and acknowledge them"
	if cl.Closed() {
		msg = "mqtt: command not taken for the disconnected device's session: it holds as many commands for its next connection as it may"
	}
	s.deviceLine(slog.LevelWarn, hub.ReasonCommandsHeld, cl.ID, msg,
		"topic", ratelog.Clip(pk.TopicName, maxLoggedTopic), "size", len(pk.Payload), "reason", hub.ReasonCommandsHeld,
		"held", cl.State.Inflight.Len(), "held_bytes", cl.HeldBytes(), "limit", s.cfg.MaxInflight, "limit_bytes", s.cfg.MaxHeldBytes,
		"held_bytes_all", s.mq.HeldBytes(), "limit_bytes_all", s.cfg.MaxHeldBytesTotal)
}

package coap

import (
	"log/slog"
	"strconv"
	"time"

	"github.com/bastion-iot/bastion/internal/ratelog"
)

// refusalLogEvery spaces the lines of refusals that come before a device
// is authenticated (plaintextLogEvery for plaintext datagrams).
const refusalLogEvery = 10 * time.Second

// refusalLine logs msg with args at most once per kind per
// refusalLogEvery (ratelog.Every.Line): for refusals anyone on the network
// can cause before a device is authenticated (a handshake over a limit,
// an unknown PSK identity, a certificate not accepted). The caller counts
// each in the metric.
func (s *Server) refusalLine(kind, msg string, args ...any) {
	s.lines.Line(s.log, slog.LevelWarn, kind, msg, args...)
}

// deviceLine logs msg at level unless a line of the same kind about the
// same device went out less than refusalLogEvery ago: for refusals of
// what an authenticated device sends (a bad path, a payload over the
// limit, a request that does not decode, a full queue), which a device
// stuck in a loop repeats at the rate it can send. Keyed by device, so one
// such device does not hide the lines about another. The caller counts
// each in the metric after the line, so that whoever sees the count sees
// the line.
func (s *Server) deviceLine(level slog.Level, kind, device, msg string, args ...any) {
	s.devLines.DeviceLine(s.log, level, kind, device, msg, args...)
}

// sessionLine logs a refusal of what session se sent. For an operational
// session (KindDevice), whose device the gateway enrolled, it is
// deviceLine: one line per kind and device. For an enrollment session it
// is one line per kind per refusalLogEvery whatever the identity, cut
// (ratelog.MaxText): anyone may open one under an identity of their
// choice (the PAKE's PSK is public), and a line per identity let a host
// write one per session it opened. se nil (a session refused after its
// handshake) is deviceLine with no device. The caller counts each in the
// metric after the line.
func (s *Server) sessionLine(se *session, level slog.Level, kind, msg string, args ...any) {
	switch {
	case se == nil:
		s.deviceLine(level, kind, "", msg, args...)
	case se.enroll.kind == KindDevice:
		s.deviceLine(level, kind, se.device, msg, args...)
	default:
		s.lines.Line(s.log, level, "enroll:"+kind, msg, append([]any{"device", ratelog.Clip(se.device, ratelog.MaxText)}, args...)...)
	}
}

// maxLoggedIdentity bounds a peer-chosen identity in a log line.
const maxLoggedIdentity = 64

// loggedIdentity is an identity the peer chose (a PSK identity: up to
// 65535 bytes of anything) cut after maxLoggedIdentity bytes, marked with
// its full length. Its bytes are left as they are: slog's handlers quote
// and escape a value with control bytes, spaces or invalid UTF-8.
func loggedIdentity(b []byte) string {
	if len(b) <= maxLoggedIdentity {
		return string(b)
	}
	return string(b[:maxLoggedIdentity]) + "… (" + strconv.Itoa(len(b)) + " bytes)"
}

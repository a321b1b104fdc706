package coap

import (
	"log/slog"
	"strconv"
	"time"
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

package upstream

import (
	"errors"
	"log/slog"

	"github.com/bastion-iot/bastion/internal/ratelog"
)

// ErrCommandTooLarge is Deliver's refusal of a command larger than the
// device transports carry (the gateway's deliverCommand). The link counts
// it bastion_upstream_downlink_total{result="too_large"}.
var ErrCommandTooLarge = errors.New("command too large for the device transports")

// downlinkResult is the result a Deliver error counts in
// bastion_upstream_downlink_total.
func downlinkResult(err error) string {
	if errors.Is(err, ErrCommandTooLarge) {
		return "too_large"
	}
	return "refused"
}

// downlinkLine logs a line about a downlink command at most once a minute
// per result (u.lines), saying how many of that result were not logged
// since: the broker sends commands at whatever rate it likes, and the
// metric counts each. Not keyed by device: the id is a level of the
// broker's topic, and a kind per id would let the broker make the limiter
// hold as many as it names. The id and topic are clipped, since a topic
// can be as long as the packet (256 KiB).
func (u *Upstream) downlinkLine(level slog.Level, result, msg, device, topic string, args ...any) {
	u.lines.Line(u.log, level, "downlink_"+result, msg,
		append([]any{"device", ratelog.Clip(device, ratelog.MaxText), "topic", ratelog.Clip(topic, ratelog.MaxText), "result", result}, args...)...)
}

package hub

import (
	"strings"
	"unicode/utf8"

	"github.com/bastion-iot/bastion/bridges"
)

// Topic classes under devices/{id}/.
const (
	// ClassTelemetry is what devices publish: devices/{id}/t/...
	ClassTelemetry = "t"
	// ClassStatus is device status (online, version ...): devices/{id}/s/...
	// Devices publish it; it goes to the Sink like telemetry.
	ClassStatus = "s"
	// ClassCommand is what devices receive: devices/{id}/c/...
	ClassCommand = "c"
)

// BroadcastPrefix is the gateway-owned tree every device may read and none
// may write.
const BroadcastPrefix = "bastion/broadcast/"

// MaxPathLen bounds a topic path (the part of a topic after
// devices/{id}/t/, s/ or c/, or after bastion/broadcast/) and a
// subscription filter's below its root, in bytes.
const MaxPathLen = 256

// ValidPath reports whether p (the part of a topic after devices/{id}/t/ or
// c/) is a usable topic path: non-empty segments, no MQTT wildcards, no
// NUL, valid UTF-8, bounded length.
func ValidPath(p string) bool {
	if p == "" || len(p) > MaxPathLen || !utf8.ValidString(p) {
		return false
	}
	// Segment by segment without splitting: this runs for every message.
	for more := true; more; {
		var seg string
		seg, p, more = strings.Cut(p, "/")
		if seg == "" || seg == "." || seg == ".." || strings.ContainsAny(seg, "+#\x00$") {
			return false
		}
	}
	return true
}

// TelemetryTopic maps a CoAP URI path below /t/ (segments joined with /)
// to the device's MQTT topic, or false if the path is not acceptable.
func TelemetryTopic(device, path string) (string, bool) {
	if !ValidPath(path) {
		return "", false
	}
	return bridges.TopicPrefix(device) + ClassTelemetry + "/" + path, true
}

// CommandTopic maps a CoAP URI path below /c/ to the command topic. An
// empty path means every command for the device.
func CommandTopic(device, path string) (string, bool) {
	if path == "" {
		return bridges.TopicPrefix(device) + ClassCommand, true
	}
	if !ValidPath(path) {
		return "", false
	}
	return bridges.TopicPrefix(device) + ClassCommand + "/" + path, true
}

// CommandPath returns the path of a command topic for device, or false if
// topic is not devices/{device}/c/<path>.
func CommandPath(device, topic string) (string, bool) {
	pre := bridges.TopicPrefix(device) + ClassCommand + "/"
	if device == "" || !strings.HasPrefix(topic, pre) {
		return "", false
	}
	p := topic[len(pre):]
	return p, ValidPath(p)
}

// MayPublish reports whether device may publish on topic: only its own
// telemetry and status trees, with a concrete (wildcard-free) path.
func MayPublish(device, topic string) bool {
	pre := bridges.TopicPrefix(device)
	if device == "" || !strings.HasPrefix(topic, pre) {
		return false
	}
	rest := topic[len(pre):]
	for _, c := range []string{ClassTelemetry, ClassStatus} {
		if p, ok := strings.CutPrefix(rest, c+"/"); ok {
			return ValidPath(p)
		}
	}
	return false
}

// MaySubscribe reports whether device may subscribe to filter: its own
// command tree (wildcards allowed below devices/{id}/c) and the broadcast
// tree, at most MaxPathLen bytes below either root. The bound is the
// topics': a filter can still name any topic, while each of its levels is
// a node of the broker's topic tree, kept for an hour after the session.
func MaySubscribe(device, filter string) bool {
	if device == "" || !utf8.ValidString(filter) || strings.ContainsRune(filter, 0) {
		return false
	}
	own := bridges.TopicPrefix(device) + ClassCommand
	for _, root := range []string{own, strings.TrimSuffix(BroadcastPrefix, "/")} {
		if filter == root+"/#" {
			return true
		}
		if rest, ok := strings.CutPrefix(filter, root+"/"); ok && validFilterRest(rest) {
			return true
		}
	}
	return false
}

// MayRead reports whether a message on topic may be delivered to device (the
// broker asks this for every delivery, and for every subscription filter
// with the same question): its own commands and broadcasts, each a valid
// path (ValidPath) below its root.
func MayRead(device, topic string) bool {
	if _, ok := CommandPath(device, topic); ok {
		return true
	}
	p, ok := strings.CutPrefix(topic, BroadcastPrefix)
	return ok && ValidPath(p)
}

func validFilterRest(rest string) bool {
	if len(rest) > MaxPathLen {
		return false
	}
	segs := strings.Split(rest, "/")
	for i, s := range segs {
		switch {
		case s == "#":
			if i != len(segs)-1 {
				return false
			}
		case s == "+":
		case s == "" || strings.ContainsAny(s, "+#$"):
			return false
		}
	}
	return true
}

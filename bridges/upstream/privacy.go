package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// verdict is what the privacy rules decide for one message.
type verdict int

const (
	withhold verdict = iota // stays local
	send
	hold // neither sent nor deleted: the rules are not known now (ActionHold)
)

// Withheld reasons of a redact rule that cannot be applied.
const (
	reasonRedactNotJSON   = "redact_not_json"   // the payload is not one JSON object
	reasonRedactNotObject = "redact_not_object" // a named field sits under a value redaction cannot reach into
	reasonRulesUnreadable = "rules_unreadable"  // an ActionHold rule: the gateway cannot read its rules
)

// applyRules returns the payload to send, or withhold with a reason
// ("no_rule", "local", reasonRedactNotJSON, reasonRedactNotObject; for the
// last two, err says why), or hold (reasonRulesUnreadable). When several
// rules match, the most restrictive wins, whatever their order: local over
// hold over redact over forward, and every
// matching redact rule's fields are removed. The rules come from two places
// (the console and bastion.yaml) and the console's are listed in topic
// order, so an order-based rule would let a broad forward rule undo a
// narrower local one.
func applyRules(rules []Rule, topic string, payload []byte) (verdict, []byte, string, error) {
	redacting, forward, held := false, false, false
	var fields []string
	for _, r := range rules {
		if !matchFilter(r.Topic, topic) {
			continue
		}
		switch r.Action {
		case ActionLocal:
			return withhold, nil, "local", nil
		case ActionRedact:
			redacting = true
			fields = append(fields, r.Fields...)
		case ActionForward:
			forward = true
		case ActionHold:
			held = true
		}
	}
	switch {
	case held:
		return hold, nil, reasonRulesUnreadable, nil
	case redacting:
		out, err := redact(payload, fields)
		var ne notObjectError
		switch {
		case errors.As(err, &ne):
			return withhold, nil, reasonRedactNotObject, err
		case err != nil:
			// Fail closed: a payload we cannot redact does not leave.
			return withhold, nil, reasonRedactNotJSON, err
		}
		return send, out, "", nil
	case forward:
		return send, payload, "", nil
	}
	return withhold, nil, "no_rule", nil
}

// redact removes fields from a JSON object payload. A dotted name reaches
// into nested objects (gps.lat), through arrays into each of their elements
// (a track "gps":[{"lat":..},..] loses every lat), and also names a key
// that itself holds the dot ("gps.lat":..): a device's JSON may be shaped
// any of these ways and the rule is meant to hide the datum, not one
// spelling of it. A path that runs into a value redaction cannot reach
// into (a string or number: "gps":"51.5,0.1") is an error, since the field
// may well be in it, or be it; null and a boolean hold nothing and are
// kept ({"gps":false} is forwarded, gps.lat is absent).
func redact(payload []byte, fields []string) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber() // keep numbers exactly as sent
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return nil, fmt.Errorf("redact: payload is not a JSON object: %w", err)
	}
	if obj == nil || dec.More() {
		return nil, fmt.Errorf("redact: payload is not one JSON object")
	}
	for _, f := range fields {
		if err := redactPath(obj, strings.Split(f, "."), f, ""); err != nil {
			return nil, err
		}
	}
	return json.Marshal(obj)
}

// notObjectError: field's path reached at, which holds a JSON value of
// kind, not an object or array.
type notObjectError struct{ field, at, kind string }

func (e notObjectError) Error() string {
	return fmt.Sprintf("redact field %q: %q holds a %s, not an object, so %s cannot be removed from it; the message stays local (fix the rule's fields or the device's payload)", e.field, e.at, e.kind, e.field)
}

// redactPath removes path from v, reading its levels as keys every way
// they can be grouped ("a.b.c": a/b/c, "a.b"/c, a/"b.c", "a.b.c"). at is
// the key path to v, for the error. The groupings are at most
// 2^(len(path)-1) and only those whose keys exist are followed.
func redactPath(v any, path []string, field, at string) error {
	switch v := v.(type) {
	case map[string]any:
		for i := 1; i <= len(path); i++ {
			k := strings.Join(path[:i], ".")
			child, ok := v[k]
			if !ok {
				continue
			}
			if i == len(path) {
				delete(v, k)
				continue
			}
			next := k
			if at != "" {
				next = at + "." + k
			}
			if err := redactPath(child, path[i:], field, next); err != nil {
				return err
			}
		}
		return nil
	case []any:
		for _, e := range v {
			if err := redactPath(e, path, field, at); err != nil {
				return err
			}
		}
		return nil
	case nil, bool:
		return nil
	case string:
		return notObjectError{field, at, "string"}
	case json.Number:
		return notObjectError{field, at, "number"}
	}
	return notObjectError{field, at, fmt.Sprintf("%T", v)}
}

package upstream

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// verdict is what the privacy rules decide for one message.
type verdict int

const (
	withhold verdict = iota // stays local
	send
)

// applyRules returns the payload to send, or withhold with a reason
// ("no_rule", "local", "redact_not_json"). When several rules match, the
// most restrictive wins, whatever their order: local over redact over
// forward, and every matching redact rule's fields are removed. The rules
// come from two places (the console and bastion.yaml) and the console's are
// listed in topic order, so an order-based rule would let a broad forward
// rule undo a narrower local one.
func applyRules(rules []Rule, topic string, payload []byte) (verdict, []byte, string) {
	redacting, forward := false, false
	var fields []string
	for _, r := range rules {
		if !matchFilter(r.Topic, topic) {
			continue
		}
		switch r.Action {
		case ActionLocal:
			return withhold, nil, "local"
		case ActionRedact:
			redacting = true
			fields = append(fields, r.Fields...)
		case ActionForward:
			forward = true
		}
	}
	switch {
	case redacting:
		out, err := redact(payload, fields)
		if err != nil {
			// Fail closed: a payload we cannot redact does not leave.
			return withhold, nil, "redact_not_json"
		}
		return send, out, ""
	case forward:
		return send, payload, ""
	}
	return withhold, nil, "no_rule"
}

// redact removes fields (dotted paths into nested objects) from a JSON
// object payload.
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
		path := strings.Split(f, ".")
		m := obj
		for i, k := range path {
			if i == len(path)-1 {
				delete(m, k)
				break
			}
			next, ok := m[k].(map[string]any)
			if !ok {
				break
			}
			m = next
		}
	}
	return json.Marshal(obj)
}

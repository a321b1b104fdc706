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
// ("no_rule", "local", "redact_not_json"). First matching rule wins.
func applyRules(rules []Rule, topic string, payload []byte) (verdict, []byte, string) {
	for _, r := range rules {
		if !matchFilter(r.Topic, topic) {
			continue
		}
		switch r.Action {
		case ActionForward:
			return send, payload, ""
		case ActionLocal:
			return withhold, nil, "local"
		case ActionRedact:
			out, err := redact(payload, r.Fields)
			if err != nil {
				// Fail closed: a payload we cannot redact does not leave.
				return withhold, nil, "redact_not_json"
			}
			return send, out, ""
		}
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

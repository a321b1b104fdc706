package upstream

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// FuzzDownlink: topics arrive from the broker. Whatever matches the
// downlink subscription must map to exactly one device's command namespace
// and never to telemetry or another namespace.
func FuzzDownlink(f *testing.F) {
	for _, s := range []string{"bastion/gw1/dev1/c/led/set", "bastion/gw1/dev1/c", "bastion/gw1//c/x", "bastion/gw1/+/c/#", "bastion/gw2/d/c/x", "bastion/gw1/d/t/x", "bastion/gw1/d/c/../../x"} {
		f.Add(s)
	}
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, topic string) {
		for _, r := range rs.down {
			id, rest, ok := r.from.match(topic)
			if !ok {
				continue
			}
			if !matchFilter(r.from.filter(), topic) {
				t.Fatalf("%q matched the template but not its subscription filter %q", topic, r.from.filter())
			}
			if id == "" || strings.ContainsAny(id, "/+#") {
				t.Fatalf("%q gave device id %q", topic, id)
			}
			local := r.to.render(id, rest)
			if !strings.HasPrefix(local, "devices/"+id+"/c") {
				t.Fatalf("%q mapped to %q, outside devices/%s/c", topic, local, id)
			}
			if _, ok := rs.mapUp(id, local); ok || rs.mapsUp(id, local) {
				t.Fatalf("command %q for %s would be sent upstream again (loop)", local, id)
			}
		}
	})
}

// FuzzRedact: payloads come from devices. Redaction never panics, and what
// it returns is JSON without the redacted field.
func FuzzRedact(f *testing.F) {
	for _, s := range []string{`{"lat":1.5,"lon":2,"fix":3}`, `{"gps":{"lat":1}}`, `[]`, `null`, `{"a":1} x`, `{"lat":{"lat":1}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		out, err := redact(payload, []string{"lat", "gps.lat"})
		if err != nil {
			return
		}
		// UseNumber: the output keeps a device's numbers as they came, and
		// JSON numbers need not fit a float64 (1E700 is valid JSON).
		var m map[string]any
		d := json.NewDecoder(bytes.NewReader(out))
		d.UseNumber()
		if err := d.Decode(&m); err != nil || d.More() {
			t.Fatalf("redacted output is not one JSON object: %q: %v", out, err)
		}
		if _, ok := m["lat"]; ok {
			t.Fatalf("lat survived redaction: %q -> %q", payload, out)
		}
		if g, ok := m["gps"].(map[string]any); ok {
			if _, ok := g["lat"]; ok {
				t.Fatalf("gps.lat survived redaction: %q -> %q", payload, out)
			}
		}
	})
}

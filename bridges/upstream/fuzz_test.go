package upstream

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/eclipse/paho.golang/packets"
)

// FuzzDownlink: topics arrive from the broker. Whatever matches the
// downlink subscription must map to exactly one device's command namespace
// and never to telemetry or another namespace.
func FuzzDownlink(f *testing.F) {
	for _, s := range []string{"bastion/gw1/dev1/c/led/set", "bastion/gw1/dev1/c", "bastion/gw1//c/x", "bastion/gw1/+/c/#", "bastion/gw2/d/c/x", "bastion/gw1/d/t/x", "bastion/gw1/d/c/../../x"} {
		f.Add(s)
	}
	// The topics of PUBLISHes a real Mosquitto broker sent its MQTT 5
	// subscribers (bridges/mqtt/testdata/packets), read with paho's
	// decoder, which the link (MQTT 5) reads the broker with.
	files, _ := filepath.Glob("../mqtt/testdata/packets/*-v5*-s2c-publish.bin")
	if len(files) == 0 {
		f.Fatal("no MQTT 5 broker PUBLISH captures in ../mqtt/testdata/packets")
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		cp, err := packets.ReadPacket(bytes.NewReader(b))
		if err != nil {
			f.Fatalf("%s: %v", p, err)
		}
		pub, ok := cp.Content.(*packets.Publish)
		if !ok {
			f.Fatalf("%s: %s, not a PUBLISH", p, cp.PacketType())
		}
		f.Add(pub.Topic)
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
			if _, ok := rs.mapUp(id, local); ok {
				t.Fatalf("command %q for %s would be sent upstream again (loop)", local, id)
			}
		}
	})
}

// FuzzRedact: payloads come from devices. Redaction never panics, and what
// it returns is one JSON object in which no redacted field survives in any
// spelling: nested objects, objects inside arrays on the way, or a key that
// holds the dot. Nor does a value on a redacted field's way that redaction
// cannot look into (a string or number where gps.lat needs gps to be an
// object): the field may be in it, so such a payload must be refused. null
// and a boolean hold nothing: such a payload is forwarded.
func FuzzRedact(f *testing.F) {
	for _, s := range []string{`{"lat":1.5,"lon":2,"fix":3}`, `{"gps":{"lat":1}}`, `[]`, `null`, `{"a":1} x`, `{"lat":{"lat":1}}`,
		`{"gps":[{"lat":51.5}]}`, `{"gps":"51.5,0.1"}`, `{"gps.lat":51.5}`, `{"gps":[[{"lat":1}],null,{"x":{"lat":2}}]}`, `{"gps":null}`, `{"gps":false}`, `{"gps":[true,{"lat":1}]}`, `{"gps":7}`} {
		f.Add([]byte(s))
	}
	fields := []string{"lat", "gps.lat"}
	f.Fuzz(func(t *testing.T, payload []byte) {
		out, err := redact(payload, fields)
		if err != nil {
			var ne notObjectError
			if errors.As(err, &ne) && ne.kind != "string" && ne.kind != "number" {
				t.Fatalf("refused for a %s, which holds nothing to redact: %q: %v", ne.kind, payload, err)
			}
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
		// Every key path of the output, arrays walked through: a redacted
		// field is none of them, and no scalar other than null or a
		// boolean sits at a strict prefix of one.
		var walk func(v any, name string, root bool)
		walk = func(v any, name string, root bool) {
			switch v := v.(type) {
			case map[string]any:
				for k, c := range v {
					n := k
					if !root {
						n = name + "." + k
					}
					if slices.Contains(fields, n) {
						t.Fatalf("%s survived redaction: %q -> %q", n, payload, out)
					}
					walk(c, n, false)
				}
			case []any:
				for _, c := range v {
					walk(c, name, root)
				}
			case nil, bool:
			default:
				for _, f := range fields {
					if !root && strings.HasPrefix(f, name+".") {
						t.Fatalf("%s is a %T that may hold %s, sent anyway: %q -> %q", name, v, f, payload, out)
					}
				}
			}
		}
		walk(m, "", true)
	})
}

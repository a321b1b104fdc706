package upstream

import (
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func validConfig() Config {
	c := Config{Broker: "mqtts://broker.example.com:8883", CAFile: "ca.pem", CertFile: "c.pem", KeyFile: "k.pem", Gateway: "gw1",
		Forward: []Rule{{Topic: "devices/+/t/#", Action: ActionForward}}}
	c.Defaults()
	return c
}

func TestConfigValidate(t *testing.T) {
	cases := map[string]struct {
		edit func(*Config)
		want []string // substrings of the error; none means valid
	}{
		"defaults are valid":  {edit: func(c *Config) {}},
		"tls 1.2 allowed":     {edit: func(c *Config) { c.TLSMinVersion = "1.2" }},
		"plain mqtt refused":  {edit: func(c *Config) { c.Broker = "mqtt://b:1883" }, want: []string{"upstream.broker", "TLS is required"}},
		"no port":             {edit: func(c *Config) { c.Broker = "mqtts://b" }, want: []string{"upstream.broker", "host and a port"}},
		"tls 1.1 refused":     {edit: func(c *Config) { c.TLSMinVersion = "1.1" }, want: []string{"upstream.tls_min_version", `"1.3"`}},
		"no ca":               {edit: func(c *Config) { c.CAFile = "" }, want: []string{"upstream.ca_file", "required"}},
		"no cert":             {edit: func(c *Config) { c.CertFile = "" }, want: []string{"upstream.cert_file"}},
		"bad gateway":         {edit: func(c *Config) { c.Gateway = "a/b" }, want: []string{"upstream.gateway"}},
		"wildcard prefix":     {edit: func(c *Config) { c.Prefix = "+" }, want: []string{"upstream.prefix"}},
		"backoff order":       {edit: func(c *Config) { c.BackoffMax = c.BackoffMin }, want: []string{"upstream.backoff_min"}},
		"window":              {edit: func(c *Config) { c.Window = -1 }, want: []string{"upstream.window"}},
		"unknown action":      {edit: func(c *Config) { c.Forward = []Rule{{Topic: "devices/#", Action: "send"}} }, want: []string{"upstream.forward[0].action", "forward, redact or local"}},
		"redact needs fields": {edit: func(c *Config) { c.Forward = []Rule{{Topic: "devices/#", Action: ActionRedact}} }, want: []string{"upstream.forward[0].fields"}},
		"bad rule filter":     {edit: func(c *Config) { c.Forward = []Rule{{Topic: "devices/#/x", Action: ActionForward}} }, want: []string{"upstream.forward[0].topic"}},
		"hold on #":           {edit: func(c *Config) { c.Forward = []Rule{{Topic: "#", Action: ActionHold}} }},
		"hold on a topic":     {edit: func(c *Config) { c.Forward = []Rule{{Topic: "devices/#", Action: ActionHold}} }, want: []string{"upstream.forward[0]: hold is only for topic \"#\""}},
		"uplink outside ns":   {edit: func(c *Config) { c.Uplink = []Mapping{{Local: "other/{id}/#", Remote: "{prefix}/{id}/#"}} }, want: []string{"upstream.uplink[0].local", "devices/{id}/"}},
		"uplink without id":   {edit: func(c *Config) { c.Uplink = []Mapping{{Local: "devices/{id}/t/#", Remote: "{prefix}/t/#"}} }, want: []string{"upstream.uplink[0].remote", "no {id}"}},
		"uplink no final #":   {edit: func(c *Config) { c.Uplink = []Mapping{{Local: "devices/{id}/t", Remote: "{prefix}/{id}/#"}} }, want: []string{"upstream.uplink[0].local", "/#"}},
		"downlink outside ns": {edit: func(c *Config) { c.Downlink = []Mapping{{Remote: "{prefix}/{id}/c/#", Local: "cmd/{id}/#"}} }, want: []string{"upstream.downlink[0].local"}},
		"remote loop": {edit: func(c *Config) {
			c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/#", Local: "devices/{id}/c/#"}}
		}, want: []string{"upstream.uplink[0].remote", "upstream.downlink[0].remote", "loop"}},
		"local loop": {edit: func(c *Config) {
			c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/t/#"}}
		}, want: []string{"upstream.downlink[0].local", "loop"}},
		"same remote for both": {edit: func(c *Config) {
			c.Uplink = []Mapping{{Local: "devices/{id}/t/#", Remote: "x/{id}/#"}}
			c.Downlink = []Mapping{{Remote: "x/{id}/#", Local: "devices/{id}/c/#"}}
		}, want: []string{"loop"}},
		// A command on bastion/gw1/cmd/c/x matched both: the first mapping
		// made it one for device "cmd", and a broker may deliver it once
		// per subscription.
		"overlapping downlinks": {edit: func(c *Config) {
			c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/c/#"}, {Remote: "{prefix}/{gateway}/cmd/{id}/#", Local: "devices/{id}/c/cmd/#"}}
		}, want: []string{`upstream.downlink[1].remote: "{prefix}/{gateway}/cmd/{id}/#" overlaps upstream.downlink[0].remote "{prefix}/{gateway}/{id}/c/#": a topic such as "bastion/gw1/cmd/c" matches both`, "make them disjoint"}},
		"same downlink twice": {edit: func(c *Config) {
			c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/c/#"}, {Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/c/#"}}
		}, want: []string{"upstream.downlink[1].remote", "overlaps upstream.downlink[0].remote"}},
		"topic limits":          {edit: func(c *Config) { c.MaxTopicLength, c.MaxTopicLevels = 256, 8 }},
		"negative topic length": {edit: func(c *Config) { c.MaxTopicLength = -1 }, want: []string{"upstream.max_topic_length: -1 is not accepted"}},
		"huge topic levels":     {edit: func(c *Config) { c.MaxTopicLevels = 40000 }, want: []string{"upstream.max_topic_levels: 40000 is not accepted"}},
		// bastion/gw1/{id}/t/# makes topics of at least 4 levels and 15 bytes.
		"levels below mapping": {edit: func(c *Config) { c.MaxTopicLevels = 3 }, want: []string{`upstream.max_topic_levels: 3 is fewer than the 4 levels upstream.uplink[0].remote "{prefix}/{gateway}/{id}/t/#" gives every topic`}},
		"length below mapping": {edit: func(c *Config) { c.MaxTopicLength = 14 }, want: []string{`upstream.max_topic_length: 14 is shorter than the 15 bytes upstream.uplink[0].remote`}},
		"limits just fit":      {edit: func(c *Config) { c.MaxTopicLength, c.MaxTopicLevels = 15, 4 }},
		"disjoint downlinks": {edit: func(c *Config) {
			c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/c/#"}, {Remote: "{prefix}/{gateway}/{id}/ota/#", Local: "devices/{id}/c/ota/#"}}
		}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			c := validConfig()
			tc.edit(&c)
			err := c.Validate()
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate: nil, want error with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestCheckLoopsDefaults(t *testing.T) {
	c := validConfig()
	if err := CheckLoops(c.Uplink, c.Downlink, c.Prefix, c.Gateway); err != nil {
		t.Fatalf("default mappings refused: %v", err)
	}
}

func TestTopicMapping(t *testing.T) {
	c := validConfig()
	rs, err := c.compile()
	if err != nil {
		t.Fatal(err)
	}
	up := map[[2]string]string{
		{"d1", "devices/d1/t/temp"}:     "bastion/gw1/d1/t/temp",
		{"d1", "devices/d1/t/a/b/c"}:    "bastion/gw1/d1/t/a/b/c",
		{"d1", "devices/d1/t"}:          "bastion/gw1/d1/t",
		{"d1", "devices/d2/t/temp"}:     "", // another device's namespace
		{"d1", "devices/d1/c/reboot"}:   "", // commands never go up
		{"d1", "devices/d1/state/x"}:    "",
		{"d1", "devices/d1/t/x/"}:       "bastion/gw1/d1/t/x/",
		{"d+", "devices/d+/t/temp"}:     "",
		{"d1", "bastion/gw1/d1/t/temp"}: "",
	}
	for in, want := range up {
		got, _ := rs.mapUp(in[0], in[1])
		if got != want {
			t.Errorf("mapUp(%q, %q) = %q, want %q", in[0], in[1], got, want)
		}
	}
	if f := rs.down[0].from.filter(); f != "bastion/gw1/+/c/#" {
		t.Errorf("downlink subscription = %q, want bastion/gw1/+/c/#", f)
	}
	id, rest, ok := rs.down[0].from.match("bastion/gw1/d7/c/set/led")
	if got := rs.down[0].to.render(id, rest); !ok || got != "devices/d7/c/set/led" {
		t.Errorf("downlink map = %q %v, want devices/d7/c/set/led", got, ok)
	}
	if _, _, ok := rs.down[0].from.match("bastion/gw2/d7/c/x"); ok {
		t.Errorf("another gateway's command matched")
	}
}

func TestOverlapExample(t *testing.T) {
	for _, c := range [][2]string{
		{"a/b", "a/b"}, {"a/+", "a/c"}, {"a/#", "a"}, {"+/t/#", "x/+/c"}, {"+/t/#", "x/+/#"}, {"#", "x"}, {"#", "#"},
		{"bastion/gw/+/c/#", "bastion/gw/cmd/+/#"}, {"p/+/+/#", "p/+/+/#"},
	} {
		for _, ab := range [][2]string{c, {c[1], c[0]}} {
			ex := overlapExample(ab[0], ab[1])
			if !matchFilter(ab[0], ex) || !matchFilter(ab[1], ex) {
				t.Errorf("overlapExample(%q, %q) = %q, which does not match both", ab[0], ab[1], ex)
			}
		}
	}
}

func TestOverlaps(t *testing.T) {
	cases := []struct {
		a, b string
		want bool
	}{
		{"a/b", "a/b", true}, {"a/b", "a/c", false}, {"a/+", "a/c", true}, {"a/#", "a", true},
		{"a/#", "b/#", false}, {"+/t/#", "x/+/c", true}, {"+/t/#", "x/c/+", false}, {"+/t/#", "x/+/#", true}, {"#", "x", true},
		{"a/b/c", "a/b", false}, {"p/g/+/t/#", "p/g/+/c/#", false},
	}
	for _, c := range cases {
		if got := overlaps(c.a, c.b); got != c.want {
			t.Errorf("overlaps(%q, %q) = %v, want %v", c.a, c.b, got, c.want)
		}
		if got := overlaps(c.b, c.a); got != c.want {
			t.Errorf("overlaps(%q, %q) = %v, want %v", c.b, c.a, got, c.want)
		}
	}
}

// TestPrivacyRules runs the rules in every order: the most restrictive
// matching rule decides (local over redact over forward, the fields of
// every matching redact rule removed), so that a broad forward rule listed
// first cannot undo a narrower local one.
func TestPrivacyRules(t *testing.T) {
	rules := []Rule{
		{Topic: "devices/+/t/secret/#", Action: ActionLocal},
		{Topic: "devices/+/t/gps", Action: ActionRedact, Fields: []string{"lat", "lon", "meta.owner"}},
		{Topic: "devices/lamp/t/#", Action: ActionRedact, Fields: []string{"alt"}},
		{Topic: "devices/+/t/#", Action: ActionForward},
	}
	cases := []struct {
		topic, payload string
		want           verdict
		out, reason    string
	}{
		{"devices/a/t/temp", `{"c":1}`, send, `{"c":1}`, ""},
		{"devices/a/t/secret/x", `{}`, withhold, "", "local"},
		{"devices/lamp/t/secret/x", `{}`, withhold, "", "local"},
		{"devices/a/t/gps", `{"lat":1.5,"lon":2,"alt":12345678901234567890,"meta":{"owner":"x","v":1}}`, send, `{"alt":12345678901234567890,"meta":{"v":1}}`, ""},
		{"devices/lamp/t/gps", `{"lat":1.5,"lon":2,"alt":3,"meta":{"owner":"x","v":1}}`, send, `{"meta":{"v":1}}`, ""},
		// meta.owner reaches through arrays and matches a key spelled with
		// the dot; a value it cannot reach into keeps the message local.
		{"devices/a/t/gps", `{"meta":[{"owner":"x","v":1},{"owner":"y"},null]}`, send, `{"meta":[{"v":1},{},null]}`, ""},
		{"devices/a/t/gps", `{"meta.owner":"x","meta":{"v":1}}`, send, `{"meta":{"v":1}}`, ""},
		{"devices/a/t/gps", `{"meta":null}`, send, `{"meta":null}`, ""},
		{"devices/a/t/gps", `{"meta":false,"lat":1}`, send, `{"meta":false}`, ""},
		{"devices/a/t/gps", `{"meta":[true,{"owner":"x"}]}`, send, `{"meta":[true,{}]}`, ""},
		{"devices/a/t/gps", `{"meta":7}`, withhold, "", "redact_not_object"},
		{"devices/a/t/gps", `{"meta":"owner=x"}`, withhold, "", "redact_not_object"},
		{"devices/a/t/gps", `{"meta":[{"v":1},"owner=x"]}`, withhold, "", "redact_not_object"},
		{"devices/a/t/gps", `not json`, withhold, "", "redact_not_json"},
		{"devices/a/t/gps", `[1,2]`, withhold, "", "redact_not_json"},
		{"devices/a/t/gps", `{"a":1} {"b":2}`, withhold, "", "redact_not_json"},
		{"devices/a/state", `{}`, withhold, "", "no_rule"},
	}
	var orders [][]Rule
	var permute func(rest, done []Rule)
	permute = func(rest, done []Rule) {
		if len(rest) == 0 {
			orders = append(orders, slices.Clone(done))
			return
		}
		for i := range rest {
			permute(slices.Concat(rest[:i], rest[i+1:]), append(done, rest[i]))
		}
	}
	permute(rules, nil)
	for _, rules := range orders {
		for _, c := range cases {
			v, out, reason, _ := applyRules(rules, c.topic, []byte(c.payload))
			if d := cmp.Diff([]any{c.want, c.out, c.reason}, []any{v, string(out), reason}); d != "" {
				t.Errorf("applyRules(%q, %s) with rules in the order %v (-want +got):\n%s", c.topic, c.payload, rules, d)
			}
		}
	}
	if v, _, reason, _ := applyRules(nil, "devices/a/t/temp", []byte("{}")); v != withhold || reason != "no_rule" {
		t.Errorf("no rules configured: %v %q, want withhold no_rule", v, reason)
	}
}

// TestPrivacyRulesHold: with a hold rule in force (the gateway cannot read
// its rules) every message is held, neither sent nor withheld, except one
// a local rule keeps local: no rule could make that one leave. Whatever
// the order of the rules.
func TestPrivacyRulesHold(t *testing.T) {
	rules := []Rule{
		{Topic: "devices/+/t/secret/#", Action: ActionLocal},
		{Topic: "#", Action: ActionHold},
		{Topic: "devices/+/t/gps", Action: ActionRedact, Fields: []string{"lat"}},
		{Topic: "devices/+/t/#", Action: ActionForward},
	}
	cases := []struct {
		topic, payload string
		want           verdict
		reason         string
	}{
		{"devices/a/t/secret/x", `{}`, withhold, "local"},
		{"devices/a/t/temp", `{"c":1}`, hold, "rules_unreadable"},
		{"devices/a/t/gps", `{"lat":1}`, hold, "rules_unreadable"},
		{"devices/a/t/gps", `not json`, hold, "rules_unreadable"},
		{"devices/a/state", `{}`, hold, "rules_unreadable"},
	}
	for i := range rules {
		order := slices.Concat(rules[i:], rules[:i])
		for _, c := range cases {
			v, out, reason, _ := applyRules(order, c.topic, []byte(c.payload))
			if d := cmp.Diff([]any{c.want, "", c.reason}, []any{v, string(out), reason}); d != "" {
				t.Errorf("applyRules(%q, %s) with rules in the order %v (-want +got):\n%s", c.topic, c.payload, order, d)
			}
		}
	}
}

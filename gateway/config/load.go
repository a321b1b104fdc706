package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"go.yaml.in/yaml/v3"
)

// Error is one problem in a configuration file, located to the line.
type Error struct {
	File string
	Line int    // 0 when the key is absent from the file (a default)
	Key  string // dotted path, e.g. "coap.listen"
	Msg  string // what is wrong and what would be accepted
}

func (e *Error) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Key == "" {
		return loc + ": " + e.Msg
	}
	return fmt.Sprintf("%s: %s: %s", loc, e.Key, e.Msg)
}

// Errors is every problem found in one file.
type Errors []*Error

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Load reads, decodes, defaults and validates the file at path. base is the
// configuration the file is decoded onto (Production() or Dev(dir)).
func Load(path string, base Config) (Config, error) {
	c, _, err := LoadWithWarnings(path, base)
	return c, err
}

// LoadWithWarnings is Load, and also returns what the file says that is
// accepted but likely not what was meant (for the log): each names the line
// and what to change.
func LoadWithWarnings(path string, base Config) (Config, []*Error, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, nil, fmt.Errorf("read config %s: %w (create it with `bastiond --write-default-config %s`)", path, err, path)
	}
	return ParseWithWarnings(path, b, base)
}

// Parse is Load for bytes already read; name is used in messages.
func Parse(name string, b []byte, base Config) (Config, error) {
	c, _, err := ParseWithWarnings(name, b, base)
	return c, err
}

// ParseWithWarnings is LoadWithWarnings for bytes already read.
func ParseWithWarnings(name string, b []byte, base Config) (Config, []*Error, error) {
	c, lines, err := parse(name, b, base)
	if err != nil {
		return Config{}, nil, err
	}
	return c, warnings(name, c, lines), nil
}

// oldWrittenGateway is the upstream.gateway that --write-default-config
// wrote into every file before it left the derived values empty.
const oldWrittenGateway = "bastion"

// warnings finds what c, read from file name, accepts but likely does not
// mean. upstream.gateway: "bastion" beside another gateway_id is what a
// file written by an older --write-default-config says after only
// gateway_id was edited: every gateway provisioned from it connects as
// client "bastion" and shares topics. An explicit value may be meant, so it
// is not changed, only named (with the upstream link off it does nothing,
// and is not named).
func warnings(name string, c Config, lines map[string]int) []*Error {
	var ws []*Error
	if l, set := lines["upstream.gateway"]; set && c.Upstream.Enabled && c.Upstream.Gateway == oldWrittenGateway && c.GatewayID != oldWrittenGateway {
		client := ""
		if c.Upstream.ClientID == oldWrittenGateway {
			client = fmt.Sprintf("connects as MQTT client id %q, ", oldWrittenGateway)
		}
		ws = append(ws, &Error{File: name, Line: l, Key: "upstream.gateway", Msg: fmt.Sprintf(
			"is %q while gateway_id is %q: this gateway %suses upstream topics %s/%s/... and subscribes to %s/%s/+/c/#, as does every gateway whose file says the same (older --write-default-config wrote this line into every file; such gateways take over each other's broker session and receive each other's commands). Unless that is meant, set upstream.gateway: \"\" to follow gateway_id (or this gateway's own id), then reload",
			c.Upstream.Gateway, c.GatewayID, client, c.Upstream.Prefix, c.Upstream.Gateway, c.Upstream.Prefix, c.Upstream.Gateway)})
	}
	return ws
}

// parse decodes, defaults and validates; lines are the file's keys' lines.
func parse(name string, b []byte, base Config) (Config, map[string]int, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return Config{}, nil, &Error{File: name, Line: yamlErrLine(err), Msg: "not valid YAML: " + trimYAMLErr(err)}
	}
	lines := map[string]int{}
	var errs Errors
	if len(root.Content) > 0 {
		doc := root.Content[0]
		if doc.Kind != yaml.MappingNode {
			return Config{}, nil, &Error{File: name, Line: doc.Line, Msg: "the file must be a YAML mapping of keys (state_dir: ..., coap: ...)"}
		}
		checkKeys(name, doc, reflect.TypeOf(Config{}), "", lines, &errs)
	}
	if len(errs) > 0 {
		return Config{}, nil, errs
	}
	c := base
	// What leaves the box is only what the file names: the base's rule
	// (device telemetry) is written into a new file by
	// --write-default-config, but a file without forward rules forwards
	// nothing rather than inheriting it unseen.
	c.Upstream.Forward = nil
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		var te *yaml.TypeError
		if errors.As(err, &te) {
			for _, m := range te.Errors {
				errs = append(errs, &Error{File: name, Line: yamlErrLine(errors.New(m)), Msg: trimYAMLErr(errors.New(m))})
			}
			return Config{}, nil, errs
		}
		return Config{}, nil, &Error{File: name, Line: yamlErrLine(err), Msg: trimYAMLErr(err)}
	}
	rederive(&c, base, lines)
	SetDefaults(&c)
	if err := c.Validate(); err != nil {
		var ves Errors
		if errors.As(err, &ves) {
			for _, e := range ves {
				e.File = name
				e.Line = lineOf(lines, e.Key)
			}
			return Config{}, nil, ves
		}
		return Config{}, nil, err
	}
	return c, lines, nil
}

// rederive empties the base's derived values that the file does not set, so
// that SetDefaults derives them again from what the file says. The base was
// defaulted before any file was read: its upstream gateway is its own
// gateway_id ("bastion"), its client id that gateway, its server name the
// host of its broker. Kept, they would outlive the file's gateway_id or
// broker: every gateway of a fleet would connect as client "bastion" (and
// take over each other's broker session) and subscribe to the same
// commands. A base value that was not derived (set on purpose) stays.
func rederive(c *Config, base Config, lines map[string]int) {
	bs, cs := derivations(&base), derivations(c)
	for i, b := range bs {
		if _, set := lines[b.key]; !set && *b.field == b.from {
			*cs[i].field = ""
		}
	}
}

// derivation is an upstream value SetDefaults derives from another one
// when the file does not set it.
type derivation struct {
	key   string
	field *string
	from  string // what it is derived as
}

// derivations are c's derived upstream values, in the order SetDefaults
// derives them: the gateway from gateway_id, the client id from the
// gateway, the server name from the broker's host.
func derivations(c *Config) []derivation {
	return []derivation{
		{"upstream.gateway", &c.Upstream.Gateway, c.GatewayID},
		{"upstream.client_id", &c.Upstream.ClientID, c.Upstream.Gateway},
		{"upstream.server_name", &c.Upstream.ServerName, upstream.BrokerHost(c.Upstream.Broker)},
	}
}

// lineOf finds the line of key or, failing that, of its nearest parent, so
// an error about a default points at the section it lives in.
func lineOf(lines map[string]int, key string) int {
	for k := key; k != ""; {
		if l, ok := lines[k]; ok {
			return l
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

// checkKeys walks the YAML tree beside the Go type, recording each key's line
// and reporting keys the type does not have, with the keys it does.
func checkKeys(file string, n *yaml.Node, t reflect.Type, path string, lines map[string]int, errs *Errors) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		if t == reflect.TypeOf(Duration(0)) {
			return
		}
		if n.Kind != yaml.MappingNode {
			*errs = append(*errs, &Error{File: file, Line: n.Line, Key: path, Msg: fmt.Sprintf("want a mapping with keys %s, got %q", strings.Join(yamlKeys(t), ", "), n.Value)})
			return
		}
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := k.Value
			if path != "" {
				key = path + "." + k.Value
			}
			ft, ok := fields[k.Value]
			if !ok {
				*errs = append(*errs, &Error{File: file, Line: k.Line, Key: key, Msg: fmt.Sprintf("unknown key; accepted here: %s", strings.Join(yamlKeys(t), ", "))})
				continue
			}
			lines[key] = k.Line
			checkKeys(file, v, ft, key, lines, errs)
		}
	case reflect.Slice:
		if n.Kind == yaml.SequenceNode {
			for i, v := range n.Content {
				key := fmt.Sprintf("%s[%d]", path, i)
				lines[key] = v.Line
				checkKeys(file, v, t.Elem(), key, lines, errs)
			}
		}
	case reflect.Map:
		if n.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(n.Content); i += 2 {
				key := path + "." + n.Content[i].Value
				lines[key] = n.Content[i].Line
				checkKeys(file, n.Content[i+1], t.Elem(), key, lines, errs)
			}
		}
	}
}

// yamlFields maps each YAML key of struct type t to its Go type, looking
// through ",inline" fields.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	fields := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if strings.Contains(f.Tag.Get("yaml"), ",inline") {
			for k, v := range yamlFields(f.Type) {
				fields[k] = v
			}
			continue
		}
		if name := yamlName(f); name != "" {
			fields[name] = f.Type
		}
	}
	return fields
}

func yamlName(f reflect.StructField) string {
	tag := f.Tag.Get("yaml")
	name, _, _ := strings.Cut(tag, ",")
	if name == "-" || !f.IsExported() {
		return ""
	}
	if name == "" {
		return strings.ToLower(f.Name)
	}
	return name
}

func yamlKeys(t reflect.Type) []string {
	var ks []string
	for k := range yamlFields(t) {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// yaml.v3 puts "line N:" inside its messages; lift it out.
func yamlErrLine(err error) int {
	s := err.Error()
	i := strings.Index(s, "line ")
	if i < 0 {
		return 0
	}
	var l int
	fmt.Sscanf(s[i+5:], "%d", &l)
	return l
}

func trimYAMLErr(err error) string {
	s := strings.TrimPrefix(err.Error(), "yaml: ")
	if i := strings.Index(s, "line "); i >= 0 {
		if j := strings.Index(s[i:], ": "); j >= 0 {
			s = s[:i] + s[i+j+2:]
		}
	}
	return strings.TrimSpace(s)
}

// UnmarshalYAML accepts Go duration strings such as "90s" or "720h".
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration; write it like 90s, 15m or 720h", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes durations back in the same form.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

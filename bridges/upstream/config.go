package upstream

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// Config is the upstream link's part of the gateway config. The gateway
// decodes it strictly, calls Defaults, then Validate.
type Config struct {
	// Broker is the upstream MQTT v5 broker: mqtts://host:port (tls://
	// and ssl:// are accepted too). Plain mqtt:// is refused.
	Broker string `toml:"broker" yaml:"broker" json:"broker"`
	// ServerName is the name the broker's certificate must carry; default
	// the host of Broker.
	ServerName string `toml:"server_name" yaml:"server_name" json:"server_name"`
	// CAFile is the PEM bundle of CAs trusted for the broker (required; the
	// system roots are never used implicitly).
	CAFile string `toml:"ca_file" yaml:"ca_file" json:"ca_file"`
	// CertFile and KeyFile are the gateway's client certificate and key.
	CertFile string `toml:"cert_file" yaml:"cert_file" json:"cert_file"`
	KeyFile  string `toml:"key_file" yaml:"key_file" json:"key_file"`
	// TLSMinVersion is "1.3" (default) or "1.2".
	TLSMinVersion string `toml:"tls_min_version" yaml:"tls_min_version" json:"tls_min_version"`
	// Gateway is this gateway's id in upstream topics and the origin marker.
	Gateway string `toml:"gateway" yaml:"gateway" json:"gateway"`
	// ClientID is the MQTT client id; default Gateway.
	ClientID string `toml:"client_id" yaml:"client_id" json:"client_id"`
	// Prefix is the first topic level upstream; default "bastion".
	Prefix string `toml:"prefix" yaml:"prefix" json:"prefix"`
	// KeepAlive is the MQTT keepalive; default 30s.
	KeepAlive time.Duration `toml:"keepalive" yaml:"keepalive" json:"keepalive"`
	// ConnectTimeout bounds one connection attempt; default 10s.
	ConnectTimeout time.Duration `toml:"connect_timeout" yaml:"connect_timeout" json:"connect_timeout"`
	// BackoffMin and BackoffMax bound the jittered exponential delay
	// between connection attempts; default 1s and 2m.
	BackoffMin time.Duration `toml:"backoff_min" yaml:"backoff_min" json:"backoff_min"`
	BackoffMax time.Duration `toml:"backoff_max" yaml:"backoff_max" json:"backoff_max"`
	// Window bounds the messages read from the queue and not yet
	// acknowledged upstream; default 256.
	Window int `toml:"window" yaml:"window" json:"window"`
	// MaxTopicLength (bytes) and MaxTopicLevels are the broker's limits on
	// an upstream topic (AWS IoT Core: 256 and 8), for brokers that answer
	// a topic beyond them by closing the connection rather than with a
	// PUBACK: the link would resend it on every reconnect, and every message
	// behind it would wait. A message whose mapped topic is beyond them is
	// parked without being sent. 0: no limit.
	MaxTopicLength int `toml:"max_topic_length" yaml:"max_topic_length" json:"max_topic_length"`
	MaxTopicLevels int `toml:"max_topic_levels" yaml:"max_topic_levels" json:"max_topic_levels"`
	// Uplink maps local device topics to upstream topics. Default:
	// devices/{id}/t/# -> {prefix}/{gateway}/{id}/t/#.
	Uplink []Mapping `toml:"uplink" yaml:"uplink" json:"uplink"`
	// Downlink maps upstream topics (subscribed with no-local) to local
	// device topics. Default: {prefix}/{gateway}/{id}/c/# -> devices/{id}/c/#.
	Downlink []Mapping `toml:"downlink" yaml:"downlink" json:"downlink"`
	// Forward are the privacy rules; where several match, the most
	// restrictive decides (applyRules). A message whose
	// topic matches no rule stays local: only what is named here leaves.
	Forward []Rule `toml:"forward" yaml:"forward" json:"forward"`
}

// Mapping is one topic mapping; both sides are templates (see topics.go).
type Mapping struct {
	Local  string `toml:"local" yaml:"local" json:"local"`
	Remote string `toml:"remote" yaml:"remote" json:"remote"`
}

// Rule is one privacy forwarding rule.
type Rule struct {
	// Topic is an MQTT filter over local topics (devices/+/t/#).
	Topic string `toml:"topic" yaml:"topic" json:"topic"`
	// Action is "forward", "redact" (drop Fields from a JSON object
	// payload), "local" (never leaves the gateway) or "hold" (on "#" only:
	// see ActionHold).
	Action string `toml:"action" yaml:"action" json:"action"`
	// Fields are the JSON fields redact removes; a dotted name reaches
	// into nested objects and arrays of them (gps.lat), see redact.
	Fields []string `toml:"fields" yaml:"fields" json:"fields"`
}

// Rule actions.
const (
	ActionForward = "forward"
	ActionRedact  = "redact"
	ActionLocal   = "local"
	// ActionHold, on "#", sends nothing and deletes nothing: queued
	// messages stay queued, unsent, and new ones are refused
	// (bridges.ErrQueueFull), so their devices keep them and send them
	// again. The gateway puts it in force while the privacy rules it adds
	// to the file's cannot be read: one of them may keep a topic local,
	// and a local rule in their place deleted every queued message,
	// though each had been acknowledged to its device. A local rule that
	// matches still withholds: no rule can make that message leave.
	ActionHold = "hold"
)

// Defaults fills unset fields. It does not touch Forward: forwarding
// nothing is the default.
func (c *Config) Defaults() {
	if c.TLSMinVersion == "" {
		c.TLSMinVersion = "1.3"
	}
	if c.ClientID == "" {
		c.ClientID = c.Gateway
	}
	if c.Prefix == "" {
		c.Prefix = "bastion"
	}
	if c.ServerName == "" {
		c.ServerName = BrokerHost(c.Broker)
	}
	if c.KeepAlive == 0 {
		c.KeepAlive = 30 * time.Second
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 10 * time.Second
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = time.Second
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = 2 * time.Minute
	}
	if c.Window == 0 {
		c.Window = 256
	}
	if len(c.Uplink) == 0 {
		c.Uplink = []Mapping{{Local: "devices/{id}/t/#", Remote: "{prefix}/{gateway}/{id}/t/#"}}
	}
	if len(c.Downlink) == 0 {
		c.Downlink = []Mapping{{Remote: "{prefix}/{gateway}/{id}/c/#", Local: "devices/{id}/c/#"}}
	}
}

// BrokerHost is the host of the broker URL, the server name the broker's
// certificate is checked against unless server_name says otherwise ("" when
// the URL does not parse).
func BrokerHost(broker string) string {
	u, err := url.Parse(broker)
	if err != nil {
		return ""
	}
	return u.Hostname()
}

var idLevel = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// Validate checks c (after Defaults) without I/O. Every error names the key
// (under "upstream.") and what is accepted.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("upstream.%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if u, err := url.Parse(c.Broker); err != nil || c.Broker == "" {
		bad("broker", "%q is not a URL; use mqtts://host:port", c.Broker)
	} else {
		switch strings.ToLower(u.Scheme) {
		case "mqtts", "tls", "ssl":
		default:
			bad("broker", "scheme %q is not accepted; use mqtts://host:port (TLS is required)", u.Scheme)
		}
		if u.Hostname() == "" || u.Port() == "" {
			bad("broker", "%q needs a host and a port, like mqtts://broker.example.com:8883", c.Broker)
		}
		if u.Path != "" && u.Path != "/" || u.User != nil || u.RawQuery != "" {
			bad("broker", "%q may not carry a path, user or query; use mqtts://host:port", c.Broker)
		}
	}
	if c.ServerName == "" {
		bad("server_name", "empty; set the name in the broker's certificate")
	}
	for key, v := range map[string]string{"ca_file": c.CAFile, "cert_file": c.CertFile, "key_file": c.KeyFile} {
		if v == "" {
			bad(key, "required: a PEM file path")
		}
	}
	if c.TLSMinVersion != "1.3" && c.TLSMinVersion != "1.2" {
		bad("tls_min_version", "%q is not accepted; use \"1.3\" (default) or \"1.2\"", c.TLSMinVersion)
	}
	if !idLevel.MatchString(c.Gateway) {
		bad("gateway", "%q is not accepted; use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit", c.Gateway)
	}
	if c.ClientID == "" || len(c.ClientID) > 128 {
		bad("client_id", "%q: use 1-128 characters", c.ClientID)
	}
	if !idLevel.MatchString(c.Prefix) {
		bad("prefix", "%q is not accepted; use 1-64 of A-Z a-z 0-9 . _ - (one topic level)", c.Prefix)
	}
	if c.KeepAlive < time.Second || c.KeepAlive > 18*time.Hour {
		bad("keepalive", "%s is not accepted; use 1s to 18h", c.KeepAlive)
	}
	if c.ConnectTimeout < 100*time.Millisecond {
		bad("connect_timeout", "%s is too short; use at least 100ms", c.ConnectTimeout)
	}
	if c.BackoffMin < time.Millisecond || c.BackoffMax <= c.BackoffMin {
		bad("backoff_min", "%s / backoff_max %s: need 1ms <= backoff_min < backoff_max", c.BackoffMin, c.BackoffMax)
	}
	if c.Window < 1 || c.Window > 65535 {
		bad("window", "%d is not accepted; use 1 to 65535", c.Window)
	}
	if c.MaxTopicLength < 0 || c.MaxTopicLength > 65535 {
		bad("max_topic_length", "%d is not accepted; use 0 (no limit) or the broker's limit in bytes, up to 65535 (AWS IoT Core: 256)", c.MaxTopicLength)
	}
	if c.MaxTopicLevels < 0 || c.MaxTopicLevels > 32768 {
		bad("max_topic_levels", "%d is not accepted; use 0 (no limit) or the broker's limit on topic levels (AWS IoT Core: 8, i.e. 7 slashes)", c.MaxTopicLevels)
	}
	if rs, err := c.compile(); err != nil {
		errs = append(errs, err)
	} else {
		for i, r := range rs.up {
			// The shortest topic the mapping makes: a one-byte id, nothing
			// for the final #.
			levels, length := len(r.to.levels)-1, len(r.to.pre)+1+len(r.to.post)
			if c.MaxTopicLevels > 0 && levels > c.MaxTopicLevels {
				bad("max_topic_levels", "%d is fewer than the %d levels upstream.uplink[%d].remote %q gives every topic: every message it maps would be parked; raise it to the broker's limit or shorten the mapping", c.MaxTopicLevels, levels, i, c.Uplink[i].Remote)
			}
			if c.MaxTopicLength > 0 && length > c.MaxTopicLength {
				bad("max_topic_length", "%d is shorter than the %d bytes upstream.uplink[%d].remote %q gives every topic: every message it maps would be parked; raise it to the broker's limit or shorten the mapping (prefix, gateway)", c.MaxTopicLength, length, i, c.Uplink[i].Remote)
			}
		}
	}
	errs = append(errs, validateRules(c.Forward)...)
	return errors.Join(errs...)
}

// beyondTopicLimits reports whether an upstream topic of length bytes and
// levels levels is beyond MaxTopicLength or MaxTopicLevels (topicLimit
// says why).
func (c *Config) beyondTopicLimits(length, levels int) bool {
	return c.MaxTopicLength > 0 && length > c.MaxTopicLength || c.MaxTopicLevels > 0 && levels > c.MaxTopicLevels
}

// topicLimit says why an upstream topic of device dev is beyond
// MaxTopicLength or MaxTopicLevels ("" when it is not), with what to
// change, and the metric label.
func (c *Config) topicLimit(topic, dev string) (why, label string) {
	if c.MaxTopicLength > 0 && len(topic) > c.MaxTopicLength {
		return fmt.Sprintf("the upstream topic %q is %d bytes, more than upstream.max_topic_length %d (the broker's limit): shorten device %s's topic or the uplink mapping, or raise upstream.max_topic_length if the broker allows it, then retry", topic, len(topic), c.MaxTopicLength, dev), "topic_too_long"
	}
	if c.MaxTopicLevels > 0 {
		if n := strings.Count(topic, "/") + 1; n > c.MaxTopicLevels {
			return fmt.Sprintf("the upstream topic %q has %d levels, more than upstream.max_topic_levels %d (the broker's limit): use fewer levels in device %s's topic or the uplink mapping, or raise upstream.max_topic_levels if the broker allows it, then retry", topic, n, c.MaxTopicLevels, dev), "topic_too_deep"
		}
	}
	return "", ""
}

// validateRules checks privacy rules without I/O; Validate and SetForward
// share it.
func validateRules(rules []Rule) []error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("upstream.%s: %s", key, fmt.Sprintf(format, a...)))
	}
	for i, r := range rules {
		key := fmt.Sprintf("forward[%d]", i)
		if err := validFilter(r.Topic); err != nil {
			bad(key+".topic", "%v", err)
		}
		switch r.Action {
		case ActionForward, ActionLocal:
			if len(r.Fields) > 0 {
				bad(key+".fields", "only used with action \"redact\"")
			}
		case ActionHold:
			if r.Topic != "#" || len(r.Fields) > 0 {
				bad(key, "hold is only for topic \"#\", with no fields")
			}
		case ActionRedact:
			if len(r.Fields) == 0 {
				bad(key+".fields", "redact needs at least one field name")
			}
			for _, f := range r.Fields {
				if f == "" || strings.HasPrefix(f, ".") || strings.HasSuffix(f, ".") || strings.Contains(f, "..") {
					bad(key+".fields", "%q is not a field name (use name or dotted.path)", f)
				}
			}
		default:
			bad(key+".action", "%q is not accepted; use forward, redact or local", r.Action)
		}
	}
	return errs
}

// compiled mappings.
type route struct {
	from, to template
}

type routes struct {
	up, down []route
}

// compile parses the mappings and refuses any that would loop. It is pure:
// Validate and the link share it.
func (c *Config) compile() (routes, error) {
	var rs routes
	var errs []error
	for i, m := range c.Uplink {
		key := fmt.Sprintf("upstream.uplink[%d]", i)
		from, err := compile(m.Local, c.Prefix, c.Gateway)
		if err == nil && (len(from.levels) < 3 || from.levels[0] != "devices" || from.idAt != 1) {
			err = fmt.Errorf("%q must start with devices/{id}/ (a device only publishes in its own namespace)", m.Local)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s.local: %w", key, err))
			continue
		}
		to, err := compile(m.Remote, c.Prefix, c.Gateway)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s.remote: %w", key, err))
			continue
		}
		rs.up = append(rs.up, route{from: from, to: to})
	}
	for i, m := range c.Downlink {
		key := fmt.Sprintf("upstream.downlink[%d]", i)
		from, err := compile(m.Remote, c.Prefix, c.Gateway)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s.remote: %w", key, err))
			continue
		}
		to, err := compile(m.Local, c.Prefix, c.Gateway)
		if err == nil && (len(to.levels) < 3 || to.levels[0] != "devices" || to.idAt != 1) {
			err = fmt.Errorf("%q must start with devices/{id}/ (commands go to one device's namespace)", m.Local)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s.local: %w", key, err))
			continue
		}
		for j, r := range rs.down {
			if overlaps(from.filter(), r.from.filter()) {
				errs = append(errs, fmt.Errorf("%s.remote: %q overlaps upstream.downlink[%d].remote %q: a topic such as %q matches both, so the first mapping decides which device a command is for and the broker may deliver it once per subscription; make them disjoint",
					key, m.Remote, j, c.Downlink[j].Remote, overlapExample(from.filter(), r.from.filter())))
			}
		}
		rs.down = append(rs.down, route{from: from, to: to})
	}
	if len(errs) == 0 {
		errs = append(errs, CheckLoops(c.Uplink, c.Downlink, c.Prefix, c.Gateway))
	}
	return rs, errors.Join(errs...)
}

// CheckLoops refuses mappings under which a message could come back to
// where it started: an uplink's upstream topics overlapping a downlink
// subscription (our telemetry would return as commands), or a downlink's
// local topics overlapping an uplink's (commands would be sent up again).
// It is pure and needs only the templates.
func CheckLoops(uplink, downlink []Mapping, prefix, gateway string) error {
	var errs []error
	for i, u := range uplink {
		ur, err1 := compile(u.Remote, prefix, gateway)
		ul, err2 := compile(u.Local, prefix, gateway)
		if err1 != nil || err2 != nil {
			return errors.Join(err1, err2)
		}
		for j, d := range downlink {
			dr, err1 := compile(d.Remote, prefix, gateway)
			dl, err2 := compile(d.Local, prefix, gateway)
			if err1 != nil || err2 != nil {
				return errors.Join(err1, err2)
			}
			if overlaps(ur.filter(), dr.filter()) {
				errs = append(errs, fmt.Errorf("upstream.uplink[%d].remote %q and upstream.downlink[%d].remote %q overlap: telemetry sent up would come back down as commands (a loop); make them disjoint, e.g. .../t/# up and .../c/# down", i, u.Remote, j, d.Remote))
			}
			if overlaps(ul.filter(), dl.filter()) {
				errs = append(errs, fmt.Errorf("upstream.uplink[%d].local %q and upstream.downlink[%d].local %q overlap: commands delivered to devices would be sent up again (a loop); make them disjoint, e.g. devices/{id}/t/# up and devices/{id}/c/# down", i, u.Local, j, d.Local))
			}
		}
	}
	return errors.Join(errs...)
}

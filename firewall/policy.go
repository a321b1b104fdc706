package firewall

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Zone names. Bastion knows exactly these two.
const (
	ZoneLAN = "lan"
	ZoneWAN = "wan"
)

// Proto is a transport protocol a service listens on.
type Proto string

// Protocols a Service may use.
const (
	TCP Proto = "tcp"
	UDP Proto = "udp"
)

// Policy is the whole firewall policy as plain data. The gateway's config
// maps onto it; Validate checks it without touching the system.
type Policy struct {
	// Zones binds zone names (lan, wan) to interface names. An interface
	// name may end in '+' to match a prefix, as in iptables.
	Zones []Zone
	// Services are the enabled services; a disabled service is simply not
	// listed, which closes its port.
	Services []Service
	// HandshakeRate limits new connections per source address to every
	// service with Handshake set. Required if any service sets it.
	HandshakeRate Rate
	// Ping lists the zones whose hosts may ping the gateway (ICMP/ICMPv6
	// echo, rate limited). wan is refused.
	Ping []string
	// Forward lists the traffic allowed through the gateway between zones.
	// Everything else is dropped.
	Forward []ForwardRule
}

// Zone binds a zone name to interfaces.
type Zone struct {
	Name       string
	Interfaces []string
}

// Service is one port the gateway answers on, and the zones it answers in.
type Service struct {
	Name  string // [a-z0-9_-], at most 24 characters; shows up in rule comments
	Proto Proto
	Port  uint16
	Zones []string
	// Handshake puts HandshakeRate on new connections to this service
	// (DTLS/TLS handshakes are what an attacker floods).
	Handshake bool
}

// ForwardRule allows new connections from one zone to another through the
// gateway. Proto and Port are optional (empty/0 means any).
type ForwardRule struct {
	From, To string
	Proto    Proto
	Port     uint16
}

// Rate is a per-source rate: Count events per Per, with Burst allowed at once.
type Rate struct {
	Count uint32
	Per   time.Duration // time.Second, time.Minute, time.Hour or 24*time.Hour
	Burst uint32
}

// IsZero reports whether r is unset.
func (r Rate) IsZero() bool { return r == Rate{} }

func (r Rate) unit() string {
	switch r.Per {
	case time.Second:
		return "sec"
	case time.Minute:
		return "min"
	case time.Hour:
		return "hour"
	case 24 * time.Hour:
		return "day"
	}
	return ""
}

// String renders r as ParseRate accepts it.
func (r Rate) String() string {
	names := map[time.Duration]string{time.Second: "second", time.Minute: "minute", time.Hour: "hour", 24 * time.Hour: "day"}
	return fmt.Sprintf("%d/%s burst %d", r.Count, names[r.Per], r.Burst)
}

// ParseRate parses "20/second burst 40" (units second, minute, hour, day;
// the burst part is optional and defaults to Count).
func ParseRate(s string) (Rate, error) {
	f := strings.Fields(s)
	if len(f) != 1 && len(f) != 3 {
		return Rate{}, fmt.Errorf("rate %q: want \"<count>/<second|minute|hour|day> [burst <n>]\"", s)
	}
	num, unit, ok := strings.Cut(f[0], "/")
	if !ok {
		return Rate{}, fmt.Errorf("rate %q: missing \"/<unit>\"", s)
	}
	n, err := strconv.ParseUint(num, 10, 32)
	if err != nil || n == 0 {
		return Rate{}, fmt.Errorf("rate %q: count %q must be a positive integer", s, num)
	}
	var per time.Duration
	switch unit {
	case "s", "sec", "second":
		per = time.Second
	case "m", "min", "minute":
		per = time.Minute
	case "h", "hour":
		per = time.Hour
	case "d", "day":
		per = 24 * time.Hour
	default:
		return Rate{}, fmt.Errorf("rate %q: unit %q must be second, minute, hour or day", s, unit)
	}
	r := Rate{Count: uint32(n), Per: per, Burst: uint32(n)}
	if len(f) == 3 {
		if f[1] != "burst" {
			return Rate{}, fmt.Errorf("rate %q: expected \"burst\", got %q", s, f[1])
		}
		b, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || b == 0 {
			return Rate{}, fmt.Errorf("rate %q: burst %q must be a positive integer", s, f[2])
		}
		r.Burst = uint32(b)
	}
	return r, r.validate()
}

func (r Rate) validate() error {
	if r.unit() == "" {
		return fmt.Errorf("rate %d per %v: period must be 1s, 1m, 1h or 24h", r.Count, r.Per)
	}
	if r.Count == 0 || r.Burst == 0 {
		return fmt.Errorf("rate %d per %v burst %d: count and burst must be positive", r.Count, r.Per, r.Burst)
	}
	// hashlimit keeps the rate as a 32-bit cost per packet; beyond this the
	// kernel refuses the rule.
	if r.Count > 10000 || r.Burst > 10000 {
		return fmt.Errorf("rate %d burst %d: count and burst must be at most 10000", r.Count, r.Burst)
	}
	return nil
}

var (
	serviceNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,23}$`)
	// Interface names as iptables -i takes them: at most 15 characters,
	// optionally a trailing '+' wildcard; characters kept to those that
	// need no quoting anywhere.
	ifaceRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$`)
)

func validIface(s string) bool {
	base := strings.TrimSuffix(s, "+")
	return ifaceRE.MatchString(base) && len(s) <= 15
}

// Validate reports every problem in p, joined, without touching the system.
func (p Policy) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }

	zones := map[string]bool{}
	owner := map[string]string{}
	for i, z := range p.Zones {
		switch z.Name {
		case ZoneLAN, ZoneWAN:
		default:
			bad("zones[%d]: name %q: must be %q or %q", i, z.Name, ZoneLAN, ZoneWAN)
			continue
		}
		if zones[z.Name] {
			bad("zones[%d]: zone %q is defined twice", i, z.Name)
		}
		zones[z.Name] = true
		if len(z.Interfaces) == 0 {
			bad("zone %s: no interfaces: bind it to at least one interface or leave it out", z.Name)
		}
		for _, ifc := range z.Interfaces {
			if !validIface(ifc) {
				bad("zone %s: interface %q: must be 1-15 characters of [A-Za-z0-9_.@-], optionally ending in '+'", z.Name, ifc)
				continue
			}
			if ifc == "lo" {
				bad("zone %s: interface lo: loopback is always allowed and belongs to no zone", z.Name)
			}
			if o, dup := owner[ifc]; dup {
				bad("zone %s: interface %q is already in zone %s: an interface belongs to one zone", z.Name, ifc, o)
			}
			owner[ifc] = z.Name
		}
	}

	names := map[string]bool{}
	ports := map[string]string{}
	for i, s := range p.Services {
		id := fmt.Sprintf("services[%d] (%s)", i, s.Name)
		if !serviceNameRE.MatchString(s.Name) {
			bad("%s: name %q: must be 1-24 characters of [a-z0-9_-] starting with a letter or digit", id, s.Name)
		}
		if names[s.Name] {
			bad("%s: service name %q is used twice", id, s.Name)
		}
		names[s.Name] = true
		if s.Proto != TCP && s.Proto != UDP {
			bad("%s: proto %q: must be %q or %q", id, s.Proto, TCP, UDP)
		}
		if s.Port == 0 {
			bad("%s: port 0: must be 1-65535", id)
		}
		key := fmt.Sprintf("%d/%s", s.Port, s.Proto)
		if o, dup := ports[key]; dup {
			bad("%s: port %s is already used by service %s", id, key, o)
		}
		ports[key] = s.Name
		if len(s.Zones) == 0 {
			bad("%s: no zones: a service must name the zones it is reachable from (lan)", id)
		}
		for _, z := range s.Zones {
			switch {
			case z == ZoneWAN:
				bad("%s: zone wan: the wan zone may never have services; nothing on wan is reachable", id)
			case !zones[z]:
				bad("%s: zone %q is not defined in zones", id, z)
			}
		}
		if s.Handshake && p.HandshakeRate.IsZero() {
			bad("%s: handshake limit requested but handshake rate is not set (e.g. \"20/second burst 40\")", id)
		}
	}
	if !p.HandshakeRate.IsZero() {
		if err := p.HandshakeRate.validate(); err != nil {
			bad("handshake rate: %w", err)
		}
	}
	for _, z := range p.Ping {
		switch {
		case z == ZoneWAN:
			bad("ping: zone wan: the gateway does not answer pings from wan")
		case !zones[z]:
			bad("ping: zone %q is not defined in zones", z)
		}
	}
	for i, f := range p.Forward {
		id := fmt.Sprintf("forward[%d] (%s -> %s)", i, f.From, f.To)
		if !zones[f.From] {
			bad("%s: from zone %q is not defined in zones", id, f.From)
		}
		if !zones[f.To] {
			bad("%s: to zone %q is not defined in zones", id, f.To)
		}
		if f.From == ZoneWAN {
			bad("%s: forwarding from wan is refused: devices behind the gateway are never reachable from wan (replies to their own connections pass anyway)", id)
		}
		if f.Proto != "" && f.Proto != TCP && f.Proto != UDP {
			bad("%s: proto %q: must be empty (any), %q or %q", id, f.Proto, TCP, UDP)
		}
		if f.Port != 0 && f.Proto == "" {
			bad("%s: port %d needs a proto (tcp or udp)", id, f.Port)
		}
	}
	return errors.Join(errs...)
}

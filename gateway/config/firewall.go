package config

import (
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/bastion-iot/bastion/firewall"
)

// FirewallPolicy derives the firewall policy from the configuration: the
// zones as configured, and one service per enabled listener, reachable from
// lan only. Listeners on port 0 (tests) have no fixed port to open and are
// left out; extra lists services opened for a while (enrollment during a
// pairing window).
func (c *Config) FirewallPolicy(extra ...firewall.Service) (firewall.Policy, error) {
	rate, err := firewall.ParseRate(c.Firewall.HandshakeRate)
	if err != nil {
		return firewall.Policy{}, err
	}
	p := firewall.Policy{HandshakeRate: rate}
	for _, part := range c.policyParts() {
		part.add(&p)
	}
	p.Services = append(p.Services, extra...)
	return p, nil
}

// policyPart is one configured item of the firewall policy, the key that
// configures it and how it goes into the policy.
type policyPart struct {
	key string
	add func(*firewall.Policy)
}

// policyParts are the parts of c's firewall policy, in the order
// FirewallPolicy adds them: the zones' interfaces (a zone with none is
// left out rather than listed empty), the listeners' services, the ping
// zones, the forward rules.
func (c *Config) policyParts() []policyPart {
	var parts []policyPart
	for _, z := range []struct {
		name string
		ifs  []string
	}{{firewall.ZoneLAN, c.Firewall.LAN}, {firewall.ZoneWAN, c.Firewall.WAN}} {
		for i, ifc := range z.ifs {
			parts = append(parts, policyPart{fmt.Sprintf("firewall.%s[%d]", z.name, i), func(p *firewall.Policy) {
				for j := range p.Zones {
					if p.Zones[j].Name == z.name {
						p.Zones[j].Interfaces = append(p.Zones[j].Interfaces, ifc)
						return
					}
				}
				p.Zones = append(p.Zones, firewall.Zone{Name: z.name, Interfaces: []string{ifc}})
			}})
		}
	}
	service := func(enabled bool, key, name string, proto firewall.Proto, listen string) {
		if !enabled || listen == "" {
			return
		}
		_, ps, err := net.SplitHostPort(listen)
		if err != nil {
			return
		}
		port, err := strconv.Atoi(ps)
		if err != nil || port <= 0 || port > 65535 {
			return
		}
		parts = append(parts, policyPart{key, func(p *firewall.Policy) {
			p.Services = append(p.Services, firewall.Service{Name: name, Proto: proto, Port: uint16(port), Zones: []string{firewall.ZoneLAN}, Handshake: true})
		}})
	}
	service(c.CoAP.Enabled, "coap.listen", "coaps", firewall.UDP, c.CoAP.Listen)
	service(c.CoAP.Enabled, "coap.psk_listen", "coaps-psk", firewall.UDP, c.CoAP.PSKListen)
	service(c.MQTT.Enabled, "mqtt.listen", "mqtt-tls", firewall.TCP, c.MQTT.Listen)
	service(c.Console.Enabled, "console.listen", "console", firewall.TCP, c.Console.Listen)
	service(c.Firmware.Enabled, "firmware.https_listen", "firmware-https", firewall.TCP, c.Firmware.HTTPSListen)
	for i, z := range c.Firewall.Ping {
		parts = append(parts, policyPart{fmt.Sprintf("firewall.ping[%d]", i), func(p *firewall.Policy) { p.Ping = append(p.Ping, z) }})
	}
	for i, f := range c.Firewall.Forward {
		parts = append(parts, policyPart{fmt.Sprintf("firewall.forward[%d]", i), func(p *firewall.Policy) {
			p.Forward = append(p.Forward, firewall.ForwardRule{From: f.From, To: f.To, Proto: firewall.Proto(f.Proto), Port: uint16(f.Port)})
		}})
	}
	return parts
}

func (c *Config) validateFirewall(errs *Errors) {
	rate, err := firewall.ParseRate(c.Firewall.HandshakeRate)
	if err != nil {
		*errs = append(*errs, &Error{Key: "firewall.handshake_rate", Msg: strconv.Quote(c.Firewall.HandshakeRate) + " " + err.Error() + " (e.g. \"20/second burst 40\")"})
		return
	}
	for i, f := range c.Firewall.Forward {
		if f.Port < 0 || f.Port > 65535 {
			*errs = append(*errs, &Error{Key: "firewall.forward[" + strconv.Itoa(i) + "].port", Msg: strconv.Quote(strconv.Itoa(f.Port)) + " is outside 0-65535 (0 means any)"})
			return
		}
	}
	// The policy reports every problem at once, each phrased for a person
	// but named by the policy's own terms (zone lan, forward[1],
	// services[2]), not by the key and line that caused it. So the policy
	// is built part by part as FirewallPolicy builds it, checked after
	// each part, and a problem that appears with a part is reported at
	// that part's key: a problem two parts make together (an interface
	// listed twice, a port two listeners share) at the later one.
	p := firewall.Policy{HandshakeRate: rate}
	before := map[string]int{}
	for _, part := range c.policyParts() {
		part.add(&p)
		now := map[string]int{}
		if err := p.Validate(); err != nil {
			for _, e := range unjoin(err) {
				msg := e.Error()
				if now[msg]++; now[msg] > before[msg] {
					*errs = append(*errs, &Error{Key: part.key, Msg: msg})
				}
			}
		}
		before = now
	}
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{errors.Unwrap(err), err}[1:]
}

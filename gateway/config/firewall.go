package config

import (
	"errors"
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
	p := firewall.Policy{HandshakeRate: rate, Ping: c.Firewall.Ping}
	// A zone with no interfaces is left out rather than listed empty.
	if len(c.Firewall.LAN) > 0 {
		p.Zones = append(p.Zones, firewall.Zone{Name: firewall.ZoneLAN, Interfaces: c.Firewall.LAN})
	}
	if len(c.Firewall.WAN) > 0 {
		p.Zones = append(p.Zones, firewall.Zone{Name: firewall.ZoneWAN, Interfaces: c.Firewall.WAN})
	}
	add := func(enabled bool, name string, proto firewall.Proto, listen string) {
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
		p.Services = append(p.Services, firewall.Service{Name: name, Proto: proto, Port: uint16(port), Zones: []string{firewall.ZoneLAN}, Handshake: true})
	}
	add(c.CoAP.Enabled, "coaps", firewall.UDP, c.CoAP.Listen)
	add(c.CoAP.Enabled, "coaps-psk", firewall.UDP, c.CoAP.PSKListen)
	add(c.MQTT.Enabled, "mqtt-tls", firewall.TCP, c.MQTT.Listen)
	add(c.Console.Enabled, "console", firewall.TCP, c.Console.Listen)
	add(c.Firmware.Enabled, "firmware-https", firewall.TCP, c.Firmware.HTTPSListen)
	p.Services = append(p.Services, extra...)
	for _, f := range c.Firewall.Forward {
		p.Forward = append(p.Forward, firewall.ForwardRule{From: f.From, To: f.To, Proto: firewall.Proto(f.Proto), Port: uint16(f.Port)})
	}
	return p, nil
}

func (c *Config) validateFirewall(errs *Errors) {
	if _, err := firewall.ParseRate(c.Firewall.HandshakeRate); err != nil {
		*errs = append(*errs, &Error{Key: "firewall.handshake_rate", Msg: strconv.Quote(c.Firewall.HandshakeRate) + " " + err.Error() + " (e.g. \"20/second burst 40\")"})
		return
	}
	for i, f := range c.Firewall.Forward {
		if f.Port < 0 || f.Port > 65535 {
			*errs = append(*errs, &Error{Key: "firewall.forward[" + strconv.Itoa(i) + "].port", Msg: strconv.Quote(strconv.Itoa(f.Port)) + " is outside 0-65535 (0 means any)"})
			return
		}
	}
	p, err := c.FirewallPolicy()
	if err != nil {
		return
	}
	if err := p.Validate(); err != nil {
		// The policy reports every problem at once; each is already phrased
		// for a person, so pass them on under the firewall key.
		for _, e := range unjoin(err) {
			*errs = append(*errs, &Error{Key: "firewall", Msg: e.Error()})
		}
	}
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{errors.Unwrap(err), err}[1:]
}

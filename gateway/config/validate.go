package config

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/bastion-iot/bastion/firewall"
)

var gatewayIDRe = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// cleartext ports are never opened, even by mistake.
var cleartextPorts = map[int]string{5683: "plain CoAP", 1883: "plain MQTT", 80: "plain HTTP"}

// Validate checks c without I/O or mutation and returns Errors naming each
// bad key (lines are added by Load).
func (c *Config) Validate() error {
	var errs Errors
	bad := func(key string, value any, format string, args ...any) {
		errs = append(errs, &Error{Key: key, Msg: fmt.Sprintf("%q ", fmt.Sprint(value)) + fmt.Sprintf(format, args...)})
	}

	if c.StateDir == "" {
		errs = append(errs, &Error{Key: "state_dir", Msg: "must be set to a directory, e.g. /var/lib/bastion"})
	}
	if !gatewayIDRe.MatchString(c.GatewayID) {
		bad("gateway_id", c.GatewayID, "is not accepted: use 1-63 lowercase letters, digits and '-', e.g. bastion-home")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", c.Log.Level, "is not a log level: use debug, info, warn or error")
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("log.format", c.Log.Format, "is not a log format: use text or json")
	}
	if c.MemoryLimit != -1 && c.MemoryLimit < 32<<20 {
		bad("memory_limit", c.MemoryLimit, "is below 32 MiB (33554432): give bytes, e.g. 167772160 for 160 MiB, or -1 for no limit")
	}

	type bound struct{ key, proto, addr string }
	var bounds []bound
	listen := func(key, proto, addr string) {
		if msg := checkListen(addr); msg != "" {
			bad(key, addr, "%s", msg)
			return
		}
		bounds = append(bounds, bound{key, proto, addr})
	}
	if c.CoAP.Enabled {
		listen("coap.listen", "udp", c.CoAP.Listen)
		if c.CoAP.PSKListen != "" {
			listen("coap.psk_listen", "udp", c.CoAP.PSKListen)
		}
		if c.CoAP.MaxPayload < 64 || c.CoAP.MaxPayload > 16384 {
			bad("coap.max_payload", c.CoAP.MaxPayload, "is out of range: use 64 to 16384 bytes")
		}
	}
	if c.MQTT.Enabled {
		listen("mqtt.listen", "tcp", c.MQTT.Listen)
		if c.MQTT.MaxPacketSize < 1024 || c.MQTT.MaxPacketSize > 16<<20 {
			bad("mqtt.max_packet_size", c.MQTT.MaxPacketSize, "is out of range: use 1024 to 16777216 bytes")
		}
		if d := c.MQTT.WriteTimeout.D(); d < time.Second || d > 10*time.Minute {
			bad("mqtt.write_timeout", d, "is out of range: use 1s to 10m (how long a device may read none of a write before it is disconnected)")
		}
	}
	if c.Console.Enabled {
		listen("console.listen", "tcp", c.Console.Listen)
	}
	if c.Firmware.Enabled {
		listen("firmware.https_listen", "tcp", c.Firmware.HTTPSListen)
	}
	if c.Pairing.ESTListen != "" {
		listen("pairing.est_listen", "tcp", c.Pairing.ESTListen)
	}
	for i := range bounds {
		for j := 0; j < i; j++ {
			a, b := bounds[i], bounds[j]
			if a.proto == b.proto && samePort(a.addr, b.addr) {
				bad(a.key, a.addr, "uses the same %s port as %s (%s): give each listener its own port", a.proto, b.key, b.addr)
			}
		}
	}

	const year = 365 * 24 * time.Hour
	if v := c.PKI.ServerCertValidity.D(); v < time.Hour || v > 398*24*time.Hour {
		bad("pki.server_cert_validity", v, "is out of range: use 1h to 9552h (398 days)")
	}
	if v := c.PKI.DeviceCertValidity.D(); v < time.Hour || v > 10*year {
		bad("pki.device_cert_validity", v, "is out of range: use 1h to 87600h (10 years)")
	}
	if v := c.PKI.RenewBefore.D(); v <= 0 || v >= c.PKI.ServerCertValidity.D() {
		bad("pki.renew_before", v, "must be positive and shorter than pki.server_cert_validity (%s)", c.PKI.ServerCertValidity.D())
	}
	for i, h := range c.PKI.Hostnames {
		if _, err := netip.ParseAddr(h); err != nil && !validHostname(h) {
			bad(fmt.Sprintf("pki.hostnames[%d]", i), h, "is neither an IP address nor a DNS name")
		}
	}

	if c.Metrics.Listen != "" {
		if msg := checkListen(c.Metrics.Listen); msg != "" {
			bad("metrics.listen", c.Metrics.Listen, "%s", msg)
		} else if host, _, _ := net.SplitHostPort(c.Metrics.Listen); !isLoopback(host) {
			bad("metrics.listen", c.Metrics.Listen, "is not on loopback: the plain-HTTP metrics endpoint may only listen on 127.0.0.1 or [::1]; the console serves no metrics: read them on the box with bastionctl metrics (the control socket) or from this loopback endpoint")
		}
	}

	seen := map[string]string{}
	for _, z := range []struct {
		name string
		ifs  []string
	}{{firewall.ZoneLAN, c.Firewall.LAN}, {firewall.ZoneWAN, c.Firewall.WAN}} {
		for i, name := range z.ifs {
			key := fmt.Sprintf("firewall.%s[%d]", z.name, i)
			// The firewall's own rule for a name, so that the two cannot
			// disagree: one of this package's accepted "eth0:1", which the
			// firewall refuses, and refused "wlan+", which it takes.
			if err := (firewall.Policy{Zones: []firewall.Zone{{Name: z.name, Interfaces: []string{name}}}}).Validate(); err != nil {
				errs = append(errs, &Error{Key: key, Msg: err.Error()})
				continue
			}
			if other, ok := seen[name]; ok && other != z.name {
				bad(key, name, "is in both lan and wan: an interface belongs to one zone")
			}
			seen[name] = z.name
		}
	}
	if c.Firewall.Manage && len(c.Firewall.LAN) == 0 {
		errs = append(errs, &Error{Key: "firewall.lan", Msg: "is empty while firewall.manage is true: name the lan interfaces (e.g. [br-lan]) or no device can reach the gateway"})
	}

	if f := c.Firmware; f.Enabled {
		for _, u := range []struct{ key, url string }{{"firmware.repository_url", f.RepositoryURL}, {"firmware.targets_url", f.TargetsURL}} {
			if (u.url != "" || u.key == "firmware.repository_url") && !strings.HasPrefix(u.url, "https://") {
				bad(u.key, u.url, "is not an https:// URL: firmware is fetched over HTTPS only")
			}
		}
		if f.TrustedRoot == "" {
			errs = append(errs, &Error{Key: "firmware.trusted_root", Msg: "must name the vendor's root.json file: it is the only trust anchor"})
		}
		if f.CheckInterval.D() < time.Minute {
			bad("firmware.check_interval", f.CheckInterval.D(), "is shorter than 1m")
		}
		if f.MaxCacheBytes < 1<<20 {
			bad("firmware.max_cache_bytes", f.MaxCacheBytes, "is below 1 MiB (1048576)")
		}
	}
	if c.Upstream.Enabled {
		if err := c.Upstream.Config.Validate(); err != nil {
			for _, e := range unjoin(err) {
				key, msg, ok := strings.Cut(e.Error(), ": ")
				if !ok {
					key, msg = "upstream", e.Error()
				}
				errs = append(errs, &Error{Key: key, Msg: msg})
			}
		}
		if c.Upstream.QueueMaxBytes < 1<<20 {
			bad("upstream.queue_max_bytes", c.Upstream.QueueMaxBytes, "is below 1 MiB (1048576)")
		}
		if n := c.Upstream.QueueMaxBytesPerDevice; n != 0 && n < 1<<20 {
			bad("upstream.queue_max_bytes_per_device", n, "is below 1 MiB (1048576); 0 is upstream.queue_max_bytes/8")
		} else if n > c.Upstream.QueueMaxBytes {
			bad("upstream.queue_max_bytes_per_device", n, "is above upstream.queue_max_bytes (%d): a device's share cannot be more than the queue; set it equal to have no share", c.Upstream.QueueMaxBytes)
		}
		if c.Upstream.ParkedMaxBytes < 1<<20 {
			bad("upstream.parked_max_bytes", c.Upstream.ParkedMaxBytes, "is below 1 MiB (1048576)")
		}
		if c.Upstream.QueueMaxAge.D() < time.Minute {
			bad("upstream.queue_max_age", c.Upstream.QueueMaxAge.D(), "is shorter than 1m")
		}
	}
	c.validatePairing(bad, &errs)
	if len(errs) == 0 && len(c.Firewall.LAN) > 0 {
		// The derived policy is checked last: its complaints would only
		// repeat the ones above.
		c.validateFirewall(&errs)
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func checkListen(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "is not host:port (e.g. 127.0.0.1:8883, [::1]:8883 or :8883)"
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "has a host that is not an IP address: listen on an address (or leave it empty for all)"
		}
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return "has a port outside 0-65535 (0 picks a free port)"
	}
	if what, ok := cleartextPorts[p]; ok {
		return fmt.Sprintf("is port %d, the port of %s: Bastion never listens in cleartext; use the secure port", p, what)
	}
	return ""
}

func samePort(a, b string) bool {
	ha, pa, _ := net.SplitHostPort(a)
	hb, pb, _ := net.SplitHostPort(b)
	if pa == "0" {
		return false // each :0 gets its own free port
	}
	return pa == pb && (ha == hb || ha == "" || hb == "" || ha == "0.0.0.0" || hb == "0.0.0.0" || ha == "::" || hb == "::")
}

func isLoopback(host string) bool {
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

var hostnameRe = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)

func validHostname(h string) bool { return len(h) <= 253 && hostnameRe.MatchString(h) }

var vendorRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (c *Config) validatePairing(bad func(key string, value any, format string, args ...any), errs *Errors) {
	p := c.Pairing
	if w := p.Window.D(); w < 10*time.Second || w > 15*time.Minute {
		bad("pairing.window", w, "is out of range: use 10s to 15m (default 2m0s)")
	}
	if p.KeyCode < 1 || p.KeyCode > 0x2ff {
		bad("pairing.key_code", p.KeyCode, "is not a key code: use 1 to 767 (0x211 is KEY_WPS_BUTTON)")
	}
	switch p.Layout {
	case "auto", "64", "32":
	default:
		bad("pairing.layout", p.Layout, "is not a struct input_event layout: use auto, 64 or 32")
	}
	if p.Input != "" && p.Input != "auto" && !strings.HasPrefix(p.Input, "/") {
		bad("pairing.input", p.Input, `is neither "auto" (every input device with key_code) nor an absolute path (an evdev node such as /dev/input/event0, or a FIFO)`)
	}
	if p.GPIOChip != "" && !strings.HasPrefix(p.GPIOChip, "/dev/") {
		bad("pairing.gpio_chip", p.GPIOChip, "is not a GPIO character device such as /dev/gpiochip0")
	}
	if p.GPIOLine < 0 || p.GPIOLine > 511 {
		bad("pairing.gpio_line", p.GPIOLine, "is out of range: use 0 to 511")
	}
	if p.GPIOLine != 0 && p.GPIOChip == "" {
		bad("pairing.gpio_line", p.GPIOLine, "is set without pairing.gpio_chip: name the chip too")
	}
	names := make([]string, 0, len(p.Vendors))
	for name := range p.Vendors {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		file := p.Vendors[name]
		key := "pairing.vendors." + name
		if !vendorRe.MatchString(name) {
			bad(key, name, "is not a vendor name: use 1-64 letters, digits, '.', '_' and '-'")
		} else if !strings.HasPrefix(file, "/") {
			bad(key, file, "is not an absolute path to a PEM file of the vendor's IDevID roots")
		}
	}
}

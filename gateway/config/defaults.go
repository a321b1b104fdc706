package config

import (
	"path/filepath"
	"time"

	"github.com/bastion-iot/bastion/bridges/upstream"
)

// Production is the default configuration of a box: every listener on all
// addresses of the lan interfaces, state under /var/lib/bastion.
func Production() Config {
	c := Config{
		CoAP:     CoAP{Enabled: true, PSKListen: ":5685"},
		MQTT:     MQTT{Enabled: true},
		Console:  Console{Enabled: true},
		Firewall: Firewall{Manage: true, LAN: []string{"eth0"}, Ping: []string{"lan"}},
		Upstream: Upstream{Config: upstream.Config{Forward: defaultForward}},
		// A router's WPS button (gpio-keys) is an input device with
		// KEY_WPS_BUTTON, whatever its event number.
		Pairing: Pairing{Input: "auto"},
	}
	SetDefaults(&c)
	return c
}

// Dev is the configuration of `bastiond --dev`: everything on loopback,
// state in stateDir, no firewall changes.
func Dev(stateDir string) Config {
	c := Config{
		StateDir:  stateDir,
		GatewayID: "bastion-dev",
		CoAP:      CoAP{Enabled: true, Listen: "127.0.0.1:5684", PSKListen: "127.0.0.1:5685"},
		MQTT:      MQTT{Enabled: true, Listen: "127.0.0.1:8883"},
		Console:   Console{Enabled: true, Listen: "127.0.0.1:8443"},
		Firmware:  Firmware{HTTPSListen: "127.0.0.1:8444"},
		PKI:       PKI{Hostnames: []string{"localhost", "127.0.0.1", "::1"}},
		// br-lan is only an example zone for the printed plan: --dev applies nothing.
		Firewall: Firewall{Manage: false, LAN: []string{"br-lan"}, Ping: []string{"lan"}},
		Upstream: Upstream{Config: upstream.Config{Forward: defaultForward}},
		// The FIFO is created 0600 in the 0700 state directory: only the
		// local user (or root) can write a press into it, which stands in
		// for physical presence on a developer's machine.
		Pairing: Pairing{Input: filepath.Join(stateDir, DevButtonFIFO)},
	}
	SetDefaults(&c)
	return c
}

// DevButtonFIFO is the dev-mode button: a FIFO in the state directory that
// carries struct input_event bytes (devicesim press-button writes them).
const DevButtonFIFO = "button.fifo"

// defaultForward names the one thing forwarded when upstream is turned on:
// device telemetry. It is written into a new config file so a person sees
// it; a file without forward rules forwards nothing (Parse).
var defaultForward = []upstream.Rule{{Topic: "devices/+/t/#", Action: "forward"}}

// DefaultMemoryLimit suits a 256 MiB box, whose systemd unit caps the
// daemon's cgroup at MemoryMax=75% = 192 MiB: the soft limit sits below that
// hard one, leaving room for memory the Go limit does not see (the store's
// mmap'd pages count in the cgroup). Raise it with the box's RAM.
const DefaultMemoryLimit = 160 << 20

// SetDefaults fills every zero value that has a default. Booleans are set
// in Production, which Load decodes the file onto, so that an explicit
// `enabled: false` stays false.
func SetDefaults(c *Config) {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	defI := func(i *int, v int) {
		if *i == 0 {
			*i = v
		}
	}
	defD := func(d *Duration, v time.Duration) {
		if *d == 0 {
			*d = Duration(v)
		}
	}
	def(&c.StateDir, "/var/lib/bastion")
	def(&c.GatewayID, "bastion")
	def(&c.Log.Level, "info")
	def(&c.Log.Format, "text")
	if c.MemoryLimit == 0 {
		c.MemoryLimit = DefaultMemoryLimit
	}
	def(&c.CoAP.Listen, ":5684")
	defI(&c.CoAP.MaxPayload, 1024)
	def(&c.MQTT.Listen, ":8883")
	defI(&c.MQTT.MaxPacketSize, 64*1024)
	defD(&c.MQTT.WriteTimeout, 30*time.Second)
	def(&c.Console.Listen, ":443")
	defD(&c.PKI.ServerCertValidity, 90*24*time.Hour)
	defD(&c.PKI.DeviceCertValidity, 365*24*time.Hour)
	defD(&c.PKI.RenewBefore, 30*24*time.Hour)
	def(&c.Firewall.HandshakeRate, "20/second burst 40")
	defD(&c.Firmware.CheckInterval, 6*time.Hour)
	def(&c.Firmware.HTTPSListen, ":8444")
	if c.Upstream.QueueMaxBytes == 0 {
		c.Upstream.QueueMaxBytes = 64 << 20
	}
	defD(&c.Upstream.QueueMaxAge, 7*24*time.Hour)
	if c.Upstream.ParkedMaxBytes == 0 {
		c.Upstream.ParkedMaxBytes = 4 << 20
	}
	def(&c.Upstream.Gateway, c.GatewayID)
	c.Upstream.Config.Defaults()
	defD(&c.Pairing.Window, 120*time.Second)
	defI(&c.Pairing.KeyCode, 0x211)
	def(&c.Pairing.Layout, "auto")
	if c.Firmware.MaxCacheBytes == 0 {
		c.Firmware.MaxCacheBytes = 1 << 30
	}
}

// Package config loads and validates bastion.yaml, the one file that
// describes a box. Loading is three steps, as STYLE.md asks: decode strictly
// (unknown keys are errors, with their line), fill defaults in one function,
// then Validate, which is pure. Every error names the file, the line, the key,
// the bad value and what would be accepted.
//
// The package never touches the network or the state directory; it only reads
// the file it is given.
package config

import (
	"time"

	"github.com/bastion-iot/bastion/bridges/upstream"
)

// Config is the whole of bastion.yaml. A reload (SIGHUP) applies some of
// its keys; the others take effect at the next restart (the gateway's
// Reload, and README.md's Configuration section, list which).
type Config struct {
	// StateDir holds the CA, the store and the control socket.
	StateDir string `yaml:"state_dir"`
	// GatewayID names this box upstream and in certificates.
	GatewayID string `yaml:"gateway_id"`
	Log       Log    `yaml:"log"`
	// MemoryLimit is the Go runtime's soft memory limit for the daemon, in
	// bytes (debug.SetMemoryLimit): the garbage collector works harder as
	// the heap nears it instead of letting it double. -1 means no limit.
	// GOMEMLIMIT in the environment, if set, wins.
	MemoryLimit int64    `yaml:"memory_limit"`
	CoAP        CoAP     `yaml:"coap"`
	MQTT        MQTT     `yaml:"mqtt"`
	Console     Console  `yaml:"console"`
	PKI         PKI      `yaml:"pki"`
	Metrics     Metrics  `yaml:"metrics"`
	Firewall    Firewall `yaml:"firewall"`
	Firmware    Firmware `yaml:"firmware"`
	Upstream    Upstream `yaml:"upstream"`
	Pairing     Pairing  `yaml:"pairing"`
}

// Pairing configures the physical-button pairing window. Only the button
// opens a window; nothing here (and nothing on the network) can.
type Pairing struct {
	// Window is how long a window stays open after a press (10s to 15m).
	Window Duration `yaml:"window"`
	// Input is "auto" (every evdev device that has KeyCode, found and
	// re-found as devices come and go; never Bluetooth ones), an evdev node
	// (/dev/input/eventN) or a FIFO carrying the same struct input_event
	// bytes ("" = no input button).
	Input string `yaml:"input"`
	// KeyCode is the key watched on Input (default 0x211 KEY_WPS_BUTTON).
	KeyCode int `yaml:"key_code"`
	// Layout of struct input_event: auto (this machine's), 64 or 32.
	Layout string `yaml:"layout"`
	// GPIOChip and GPIOLine name a GPIO button ("" = none).
	GPIOChip string `yaml:"gpio_chip"`
	GPIOLine int    `yaml:"gpio_line"`
	// Vendors maps a vendor name to a PEM file of the roots its devices'
	// manufacturer certificates (IDevID) chain to. A reload reads them
	// again and puts them in force at once.
	Vendors map[string]string `yaml:"vendors"`
	// ESTListen is the HTTPS address of EST (RFC 7030) for MQTT-only
	// devices with an IDevID; it listens only while a window is open, and
	// the firewall opens it only then ("" = off). It takes effect at the
	// next restart.
	ESTListen string `yaml:"est_listen"`
}

// Upstream configures the link to the cloud broker and the durable queue in
// front of it. The link's own keys (broker, ca_file, cert_file, key_file,
// uplink, downlink, forward ...) are those of bridges/upstream.
type Upstream struct {
	Enabled         bool `yaml:"enabled"`
	upstream.Config `yaml:",inline"`
	// QueueMaxBytes and QueueMaxAge bound the store-and-forward queue;
	// when either is reached new QoS 1 messages are refused (MQTT 0x97,
	// CoAP 5.03), never dropped. The files take up to two segments (8 MiB)
	// more than QueueMaxBytes: see queue.Options.MaxBytes.
	QueueMaxBytes int64    `yaml:"queue_max_bytes"`
	QueueMaxAge   Duration `yaml:"queue_max_age"`
	// QueueMaxBytesPerDevice is one device's share of the queue: the bytes
	// of its messages not yet delivered upstream, above which its new
	// messages are refused as a full queue while the other devices' are
	// still taken, so that one device cannot fill the queue for all. 0:
	// QueueMaxBytes/8 (at least one message of 256 KiB); QueueMaxBytes: no
	// share. See queue.Options.MaxDeviceBytes.
	QueueMaxBytesPerDevice int64 `yaml:"queue_max_bytes_per_device"`
	// ParkedMaxBytes bounds the parking queue: messages the broker refused
	// for good (too large, not authorized, invalid topic or payload), kept
	// until an operator retries or drops them. When it is full such a
	// message stays at the head of the main queue instead.
	ParkedMaxBytes int64 `yaml:"parked_max_bytes"`
}

// Firmware configures the verified firmware cache: a TUF client of the
// vendor's update repository.
type Firmware struct {
	Enabled       bool   `yaml:"enabled"`
	RepositoryURL string `yaml:"repository_url"` // https:// base of the TUF metadata
	TargetsURL    string `yaml:"targets_url"`    // default repository_url + /targets
	// TrustedRoot is the file holding the vendor's root.json: the only
	// trust anchor, never fetched on first use.
	TrustedRoot string `yaml:"trusted_root"`
	// CABundle is a PEM file of CAs for the repository's HTTPS server
	// ("" = the system roots).
	CABundle      string   `yaml:"ca_bundle"`
	CheckInterval Duration `yaml:"check_interval"`
	MaxCacheBytes int64    `yaml:"max_cache_bytes"`
	// VendorKeys maps a vendor to a PEM public key file; the gateway then
	// checks the vendor's manifest signature before offering an image.
	VendorKeys map[string]string `yaml:"vendor_keys"`
	// HTTPSListen is the HTTPS listener (client certificate required)
	// that serves verified images with Range to MQTT devices.
	HTTPSListen string `yaml:"https_listen"`
}

// Log configures the daemon's structured log.
type Log struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text or json
}

// CoAP configures the CoAP-over-DTLS listeners. Certificate and PSK devices
// use separate ports because pion/dtls offers only PSK suites once a PSK
// callback is set.
type CoAP struct {
	Enabled    bool   `yaml:"enabled"`
	Listen     string `yaml:"listen"`      // certificate devices, udp
	PSKListen  string `yaml:"psk_listen"`  // PSK devices, udp; "" disables PSK
	MaxPayload int    `yaml:"max_payload"` // bytes; larger requests get 4.13
}

// MQTT configures the MQTT-over-TLS listener.
type MQTT struct {
	Enabled bool   `yaml:"enabled"`
	Listen  string `yaml:"listen"` // tcp
	// AllowSecretAuth lets devices that cannot do client certificates log in
	// with username = device id and a per-device secret (TLS still required).
	AllowSecretAuth bool `yaml:"allow_secret_auth"`
	MaxPacketSize   int  `yaml:"max_packet_size"`
	// WriteTimeout: a device that reads none of a write (16 KiB at most)
	// for this long is disconnected; its messages stay queued.
	WriteTimeout Duration `yaml:"write_timeout"`
}

// Console configures the HTTPS console and JSON API.
type Console struct {
	Enabled bool   `yaml:"enabled"`
	Listen  string `yaml:"listen"`
}

// PKI configures the local CA.
type PKI struct {
	// Hostnames and IPs the listeners' certificates are valid for, beyond
	// the addresses they listen on.
	Hostnames          []string `yaml:"hostnames"`
	ServerCertValidity Duration `yaml:"server_cert_validity"`
	DeviceCertValidity Duration `yaml:"device_cert_validity"`
	// RenewBefore: a server certificate is re-issued when less than this
	// remains of its validity.
	RenewBefore Duration `yaml:"renew_before"`
}

// Metrics configures the optional Prometheus endpoint. Metrics are always
// available through bastionctl; this only adds a scrape endpoint, which must
// be on loopback.
type Metrics struct {
	Listen string `yaml:"listen"`
}

// Firewall binds zones to interfaces. The services each zone may reach are
// derived from what is enabled above: turning a listener off closes its
// port.
type Firewall struct {
	// Manage: apply rules (as root). Off in --dev, where the plan is printed.
	Manage bool     `yaml:"manage"`
	LAN    []string `yaml:"lan"` // interface names in the lan zone ("wlan+" matches a prefix)
	WAN    []string `yaml:"wan"` // interface names in the wan zone
	// HandshakeRate limits new DTLS/TLS handshakes per source address.
	HandshakeRate string `yaml:"handshake_rate"`
	// Ping lists the zones that may ping the box (never wan).
	Ping []string `yaml:"ping"`
	// Forward lists the traffic allowed through the box between zones.
	Forward []Forward `yaml:"forward"`
}

// Forward allows new connections from one zone to another.
type Forward struct {
	From  string `yaml:"from"`
	To    string `yaml:"to"`
	Proto string `yaml:"proto"` // tcp, udp or "" for any
	Port  int    `yaml:"port"`  // 0 for any
}

// Duration is a time.Duration written as "90s", "720h" in YAML.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

package config

import (
	"fmt"

	"io"
	"sort"
	"strings"

	"github.com/bastion-iot/bastion/bridges/upstream"
)

// WriteCommented writes c as a bastion.yaml a person can read and edit: every
// key, what it does and what it accepts.
func WriteCommented(w io.Writer, c Config) error {
	// A derived value equal to what it is derived from is written as "":
	// the file then follows its source (upstream.gateway follows
	// gateway_id when a person edits only gateway_id) instead of carrying
	// a copy of the value it had when the file was written.
	derived := map[string]string{}
	for _, d := range derivations(&c) {
		if *d.field != d.from {
			derived[d.key] = *d.field
		}
	}
	list := func(xs []string) string {
		if len(xs) == 0 {
			return "[]"
		}
		q := make([]string, len(xs))
		for i, x := range xs {
			q[i] = fmt.Sprintf("%q", x)
		}
		return "[" + strings.Join(q, ", ") + "]"
	}
	_, err := fmt.Fprintf(w, `# Bastion gateway configuration (YAML). Unknown keys are refused.
# Check a change with: bastiond --check-config FILE ; apply with SIGHUP
# (listeners, firmware, metrics and most pairing keys wait for a restart:
# the reload's log line names them).

# Where the CA, the store and the control socket live (0700, keys 0600).
state_dir: %q
# Name of this box upstream: lowercase letters, digits and '-'.
gateway_id: %q

log:
  level: %s    # debug, info, warn, error
  format: %s   # text or json

# Go soft memory limit in bytes (-1 = none; GOMEMLIMIT in the environment
# wins). Near it the garbage collector runs more often instead of letting the
# heap double. Keep it below the unit's MemoryMax (75%% of RAM): the default,
# 167772160 = 160 MiB, suits a 256 MiB box; about 320 MiB suits 512 MiB.
memory_limit: %d

# CoAP over DTLS 1.2 for constrained devices. Certificate devices use
# "listen"; PSK devices use "psk_listen" ("" turns PSK off).
coap:
  enabled: %t
  listen: %q
  psk_listen: %q
  max_payload: %d   # bytes; larger requests are refused with 4.13

# MQTT 3.1.1/5 over TLS. Client certificates are required unless
# allow_secret_auth lets a device log in with its id and a per-device secret.
mqtt:
  enabled: %t
  listen: %q
  allow_secret_auth: %t
  max_packet_size: %d
  write_timeout: %s   # a device that reads none of a write for this long is disconnected

# HTTPS console and JSON API (LAN only).
console:
  enabled: %t
  listen: %q

# The local CA.
pki:
  hostnames: %s   # names and IPs the server certificates cover
  server_cert_validity: %s
  device_cert_validity: %s
  renew_before: %s   # re-issue server certificates this long before expiry

# Prometheus scrape endpoint, loopback only ("" = off; use bastionctl metrics).
metrics:
  listen: %q

# Zones: which interfaces are lan (devices) and wan (internet). Nothing is
# reachable from wan; the enabled listeners above are reachable from lan.
# manage: false prints the plan instead of applying it.
firewall:
  manage: %t
  lan: %s   # "wlan+" matches every interface starting with wlan
  wan: %s
  handshake_rate: %q   # new DTLS/TLS handshakes per source address
  ping: %s   # zones that may ping the box (never wan)
  forward: []   # e.g. [{from: lan, to: wan, proto: tcp, port: 443}]; default deny

# Verified firmware cache: a TUF client of the vendor's update repository.
firmware:
  enabled: %t
  repository_url: %q   # https:// base of the TUF metadata
  targets_url: %q      # "" = repository_url + /targets
  trusted_root: %q     # the vendor's root.json file: the only trust anchor
  ca_bundle: %q        # PEM CAs for the repository's HTTPS ("" = system roots)
  check_interval: %s
  max_cache_bytes: %d
  vendor_keys: {}      # vendor: PEM public key file, to check manifests too
  https_listen: %q     # HTTPS with client certificates, Range: images for MQTT devices

# The cloud: MQTT v5 over TLS 1.3 with this gateway's client certificate.
# Device messages wait in a durable queue (fsync before the device's ack)
# and are deleted only after the broker's PUBACK.
upstream:
  enabled: %t
  broker: %q          # mqtts://host:port
  server_name: %q     # the name in the broker's certificate ("" = host of broker)
  ca_file: %q         # PEM CAs trusted for the broker (required; never the system roots)
  cert_file: %q       # this gateway's client certificate (PEM)
  key_file: %q        # and its key (PEM, 0600)
  tls_min_version: %q # "1.3" or "1.2"
  gateway: %q         # this gateway's id in upstream topics ("" = gateway_id)
  client_id: %q       # MQTT client id, unique on the broker ("" = gateway)
  prefix: %q
  keepalive: %s
  backoff_min: %s
  backoff_max: %s
  # The broker's limits on a topic (AWS IoT Core: 256 bytes, 8 levels), for a broker
  # that closes the connection on a topic beyond them: such a message is parked unsent.
  max_topic_length: %d   # bytes (0 = no limit)
  max_topic_levels: %d   # (0 = no limit)
  queue_max_bytes: %d  # when full, new QoS 1 messages are refused, never dropped
  queue_max_age: %s
  # One device's share of the queue: above it, its new messages are refused while
  # the other devices' are taken (0 = queue_max_bytes/8; queue_max_bytes = no share).
  queue_max_bytes_per_device: %d
  parked_max_bytes: %d # messages the broker refuses for good wait here for bastionctl upstream parked retry|drop
  # Topic mapping ("" = the defaults: devices/{id}/t/# -> {prefix}/{gateway}/{id}/t/#,
  # and {prefix}/{gateway}/{id}/c/# -> devices/{id}/c/#). Mappings that would loop, and downlinks that overlap, are refused.
  uplink: []
  downlink: []
  # Privacy: only what a rule names leaves the box; where several rules match,
  # the most restrictive decides (local, then redact, then forward).
  # action: forward, redact (drop the JSON fields listed) or local.
  forward:
%s
# Physical-button pairing. Only a press of the box's button opens a window
# (held 1-10 s; held 10 s or more cancels one); nothing on the network can.
pairing:
  window: %s        # how long a window stays open: 10s to 15m
  input: %q         # auto (every input device with key_code, not Bluetooth), an evdev node, or a FIFO of struct input_event ("" = none)
  key_code: %d      # 529 = 0x211 KEY_WPS_BUTTON
  layout: %q        # struct input_event layout: auto, 64 or 32
  gpio_chip: %q     # e.g. /dev/gpiochip0 ("" = no GPIO button)
  gpio_line: %d
  est_listen: %q    # HTTPS EST (RFC 7030) for MQTT-only IDevID devices, only while a window is open ("" = off)
  # Vendor name: PEM file of the roots its manufacturer certificates (IDevID) chain to.
  vendors:%s`, c.StateDir, c.GatewayID, c.Log.Level, c.Log.Format, c.MemoryLimit,
		c.CoAP.Enabled, c.CoAP.Listen, c.CoAP.PSKListen, c.CoAP.MaxPayload,
		c.MQTT.Enabled, c.MQTT.Listen, c.MQTT.AllowSecretAuth, c.MQTT.MaxPacketSize, c.MQTT.WriteTimeout.D(),
		c.Console.Enabled, c.Console.Listen,
		list(c.PKI.Hostnames), c.PKI.ServerCertValidity.D(), c.PKI.DeviceCertValidity.D(), c.PKI.RenewBefore.D(),
		c.Metrics.Listen, c.Firewall.Manage, list(c.Firewall.LAN), list(c.Firewall.WAN),
		c.Firewall.HandshakeRate, list(c.Firewall.Ping),
		c.Firmware.Enabled, c.Firmware.RepositoryURL, c.Firmware.TargetsURL, c.Firmware.TrustedRoot, c.Firmware.CABundle,
		c.Firmware.CheckInterval.D(), c.Firmware.MaxCacheBytes, c.Firmware.HTTPSListen,
		c.Upstream.Enabled, c.Upstream.Broker, derived["upstream.server_name"], c.Upstream.CAFile, c.Upstream.CertFile, c.Upstream.KeyFile,
		c.Upstream.TLSMinVersion, derived["upstream.gateway"], derived["upstream.client_id"], c.Upstream.Prefix, c.Upstream.KeepAlive, c.Upstream.BackoffMin, c.Upstream.BackoffMax,
		c.Upstream.MaxTopicLength, c.Upstream.MaxTopicLevels, c.Upstream.QueueMaxBytes, c.Upstream.QueueMaxAge.D(), c.Upstream.QueueMaxBytesPerDevice, c.Upstream.ParkedMaxBytes, rules(c.Upstream.Forward),
		c.Pairing.Window.D(), c.Pairing.Input, c.Pairing.KeyCode, c.Pairing.Layout, c.Pairing.GPIOChip, c.Pairing.GPIOLine, c.Pairing.ESTListen,
		vendors(c.Pairing.Vendors))
	return err
}

func rules(rs []upstream.Rule) string {
	var b strings.Builder
	for _, r := range rs {
		fmt.Fprintf(&b, "    - {topic: %q, action: %s", r.Topic, r.Action)
		if len(r.Fields) > 0 {
			q := make([]string, len(r.Fields))
			for i, f := range r.Fields {
				q[i] = fmt.Sprintf("%q", f)
			}
			fmt.Fprintf(&b, ", fields: [%s]", strings.Join(q, ", "))
		}
		b.WriteString("}\n")
	}
	if b.Len() == 0 {
		return "    []\n"
	}
	return b.String()
}

func vendors(m map[string]string) string {
	if len(m) == 0 {
		return " {}\n"
	}
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString("\n")
	for _, n := range names {
		fmt.Fprintf(&b, "    %q: %q\n", n, m[n])
	}
	return b.String()
}

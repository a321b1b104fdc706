package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/firewall"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func TestDefaultsRoundTrip(t *testing.T) {
	for name, c := range map[string]Config{"production": Production(), "dev": Dev("/tmp/x")} {
		t.Run(name, func(t *testing.T) {
			if err := c.Validate(); err != nil {
				t.Fatalf("default config invalid: %v", err)
			}
			var buf bytes.Buffer
			if err := WriteCommented(&buf, c); err != nil {
				t.Fatal(err)
			}
			got, err := Parse("written.yaml", buf.Bytes(), Config{})
			if err != nil {
				t.Fatalf("written config does not load: %v\n%s", err, buf.String())
			}
			if diff := cmp.Diff(c, got, cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("round trip (-want +got):\n%s", diff)
			}
		})
	}
}

// Every message Validate and Load can give, with the line it must point at.
func TestLoadErrors(t *testing.T) {
	tests := map[string]struct {
		yaml string
		want []string // substrings of the error, in order of the errors
	}{
		"unknown top-level key":    {"state_dir: /x\nbogus: 1\n", []string{"bad.yaml:2: bogus: unknown key; accepted here: coap, console, firewall, "}},
		"unknown nested key":       {"coap:\n  listen: \":5684\"\n  lsten: x\n", []string{"bad.yaml:3: coap.lsten: unknown key; accepted here: enabled, listen, max_payload, psk_listen"}},
		"not a mapping":            {"- a\n- b\n", []string{"bad.yaml:1: the file must be a YAML mapping"}},
		"section not mapping":      {"coap: 5\n", []string{"bad.yaml:1: coap: want a mapping with keys enabled, listen, max_payload, psk_listen"}},
		"bad yaml":                 {"coap: [\n", []string{"bad.yaml:1: not valid YAML"}},
		"wrong type":               {"coap:\n  max_payload: lots\n", []string{"bad.yaml:2: cannot unmarshal !!str `lots` into int"}},
		"bad duration":             {"pki:\n  renew_before: soon\n", []string{"bad.yaml:2: \"soon\" is not a duration; write it like 90s, 15m or 720h"}},
		"bad port":                 {"mqtt:\n  listen: \":99999\"\n", []string{"bad.yaml:2: mqtt.listen: \":99999\" has a port outside 0-65535"}},
		"not host:port":            {"mqtt:\n  listen: \"8883\"\n", []string{"mqtt.listen: \"8883\" is not host:port"}},
		"hostname listen":          {"console:\n  listen: \"box.lan:443\"\n", []string{"console.listen: \"box.lan:443\" has a host that is not an IP address"}},
		"cleartext coap":           {"coap:\n  listen: \":5683\"\n", []string{"bad.yaml:2: coap.listen: \":5683\" is port 5683, the port of plain CoAP: Bastion never listens in cleartext"}},
		"cleartext mqtt":           {"mqtt:\n  listen: \"127.0.0.1:1883\"\n", []string{"port of plain MQTT"}},
		"cleartext http":           {"console:\n  listen: \":80\"\n", []string{"port of plain HTTP"}},
		"port clash":               {"console:\n  listen: \":8883\"\n", []string{"console.listen: \":8883\" uses the same tcp port as mqtt.listen (:8883)"}},
		"psk clash":                {"coap:\n  psk_listen: \":5684\"\n", []string{"coap.psk_listen: \":5684\" uses the same udp port as coap.listen"}},
		"gateway id":               {"gateway_id: Bad_Name\n", []string{"bad.yaml:1: gateway_id: \"Bad_Name\" is not accepted: use 1-63 lowercase letters"}},
		"log level":                {"log:\n  level: loud\n", []string{"bad.yaml:2: log.level: \"loud\" is not a log level: use debug, info, warn or error"}},
		"log format":               {"log:\n  format: xml\n", []string{"log.format: \"xml\" is not a log format: use text or json"}},
		"payload range":            {"coap:\n  max_payload: 10\n", []string{"coap.max_payload: \"10\" is out of range: use 64 to 16384 bytes"}},
		"packet range":             {"mqtt:\n  max_packet_size: 100\n", []string{"mqtt.max_packet_size: \"100\" is out of range"}},
		"write timeout":            {"mqtt:\n  enabled: true\n  write_timeout: 100ms\n", []string{"bad.yaml:3: mqtt.write_timeout: \"100ms\" is out of range: use 1s to 10m"}},
		"server validity":          {"pki:\n  server_cert_validity: 10000h\n", []string{"pki.server_cert_validity: \"10000h0m0s\" is out of range: use 1h to 9552h"}},
		"device validity":          {"pki:\n  device_cert_validity: 1m\n", []string{"pki.device_cert_validity: \"1m0s\" is out of range"}},
		"renew before":             {"pki:\n  renew_before: 2400h\n", []string{"pki.renew_before: \"2400h0m0s\" must be positive and shorter than pki.server_cert_validity"}},
		"hostname":                 {"pki:\n  hostnames: [\"ok.lan\", \"bad host\"]\n", []string{"bad.yaml:2: pki.hostnames[1]: \"bad host\" is neither an IP address nor a DNS name"}},
		"metrics not loopback":     {"metrics:\n  listen: \"0.0.0.0:9184\"\n", []string{"metrics.listen: \"0.0.0.0:9184\" is not on loopback: the plain-HTTP metrics endpoint may only listen on 127.0.0.1 or [::1]; the console serves no metrics: read them on the box with bastionctl metrics (the control socket) or from this loopback endpoint"}},
		"metrics bad":              {"metrics:\n  listen: \"x\"\n", []string{"metrics.listen: \"x\" is not host:port"}},
		"iface name":               {"firewall:\n  lan: [\"eth0\", \"this-name-is-far-too-long\"]\n", []string{"bad.yaml:2: firewall.lan[1]: zone lan: interface \"this-name-is-far-too-long\": must be 1-15 characters of [A-Za-z0-9_.@-], optionally ending in '+'"}},
		"iface colon":              {"firewall:\n  lan:\n    - eth0\n    - \"eth0:1\"\n", []string{"bad.yaml:4: firewall.lan[1]: zone lan: interface \"eth0:1\": must be 1-15 characters"}},
		"iface leading dot":        {"firewall:\n  lan: [eth0]\n  wan: [.eth1]\n", []string{"bad.yaml:3: firewall.wan[0]: zone wan: interface \".eth1\": must be 1-15 characters"}},
		"iface lo":                 {"firewall:\n  lan:\n    - eth0\n    - lo\n", []string{"bad.yaml:4: firewall.lan[1]: zone lan: interface lo: loopback is always allowed and belongs to no zone"}},
		"iface wildcard":           {"firewall:\n  lan: [eth1, wlan+]\n", nil},
		"iface twice":              {"firewall:\n  lan:\n    - eth0\n    - eth1\n    - eth0\n", []string{"bad.yaml:5: firewall.lan[2]: zone lan: interface \"eth0\" is already in zone lan: an interface belongs to one zone"}},
		"iface both zones":         {"firewall:\n  lan: [eth0]\n  wan: [eth0]\n", []string{"bad.yaml:3: firewall.wan[0]: \"eth0\" is in both lan and wan"}},
		"iface errors with others": {"log:\n  level: loud\nfirewall:\n  lan: [\"eth0:1\"]\n", []string{"bad.yaml:2: log.level", "bad.yaml:4: firewall.lan[0]: zone lan: interface \"eth0:1\""}},
		"empty lan managed":        {"firewall:\n  lan: []\n", []string{"bad.yaml:2: firewall.lan: is empty while firewall.manage is true"}},
		"state dir empty":          {"state_dir: \"\"\nfirewall:\n  lan: [eth0]\n", nil}, // default refills it: no error
		"handshake rate":           {"firewall:\n  handshake_rate: lots\n", []string{"bad.yaml:2: firewall.handshake_rate: \"lots\""}},
		"wan ping":                 {"firewall:\n  wan: [eth1]\n  ping: [wan]\n", []string{"bad.yaml:3: firewall.ping[0]: ping: zone wan: the gateway does not answer pings from wan"}},
		"ping unknown zone":        {"firewall:\n  ping:\n    - lan\n    - dmz\n", []string{"bad.yaml:4: firewall.ping[1]: ping: zone \"dmz\" is not defined in zones"}},
		"forward unknown zone":     {"firewall:\n  forward:\n    - {from: lan, to: wan}\n", []string{"bad.yaml:3: firewall.forward[0]: forward[0] (lan -> wan): to zone \"wan\" is not defined in zones"}},
		"forward from wan":         {"firewall:\n  wan: [eth1]\n  forward:\n    - {from: lan, to: wan, proto: tcp, port: 443}\n    - {from: wan, to: lan}\n", []string{"bad.yaml:5: firewall.forward[1]: forward[1] (wan -> lan): forwarding from wan is refused"}},
		"forward proto":            {"firewall:\n  wan: [eth1]\n  forward:\n    - {from: lan, to: wan, proto: icmp}\n", []string{"bad.yaml:4: firewall.forward[0]: forward[0] (lan -> wan): proto \"icmp\": must be empty (any), \"tcp\" or \"udp\""}},
		"forward port no proto":    {"firewall:\n  wan: [eth1]\n  forward:\n    - {from: lan, to: wan, port: 22}\n", []string{"bad.yaml:4: firewall.forward[0]: forward[0] (lan -> wan): port 22 needs a proto (tcp or udp)"}},
		"firewall errors each at its line": {"firewall:\n  ping: [dmz]\n  forward:\n    - {from: lan, to: dmz}\n    - {from: lan, to: dmz}\n", []string{
			"bad.yaml:2: firewall.ping[0]: ping: zone \"dmz\"",
			"bad.yaml:4: firewall.forward[0]: forward[0] (lan -> dmz): to zone \"dmz\"",
			"bad.yaml:5: firewall.forward[1]: forward[1] (lan -> dmz): to zone \"dmz\"",
		}},
		"listeners share a port":      {"coap:\n  listen: \"127.0.0.1:5684\"\n  psk_listen: \"127.0.0.2:5684\"\n", []string{"bad.yaml:3: coap.psk_listen: services[1] (coaps-psk): port 5684/udp is already used by service coaps"}},
		"forward port":                {"firewall:\n  forward: [{from: lan, to: wan, proto: tcp, port: 70000}]\n", []string{"firewall.forward[0].port: \"70000\" is outside 0-65535"}},
		"firmware http":               {"firmware:\n  enabled: true\n  repository_url: http://x\n  trusted_root: /r.json\n", []string{"bad.yaml:3: firmware.repository_url: \"http://x\" is not an https:// URL"}},
		"firmware no root":            {"firmware:\n  enabled: true\n  repository_url: https://x\n", []string{"bad.yaml:1: firmware.trusted_root: must name the vendor's root.json"}},
		"firmware interval":           {"firmware:\n  enabled: true\n  repository_url: https://x\n  trusted_root: /r\n  check_interval: 5s\n", []string{"bad.yaml:5: firmware.check_interval: \"5s\" is shorter than 1m"}},
		"firmware cache":              {"firmware:\n  enabled: true\n  repository_url: https://x\n  trusted_root: /r\n  max_cache_bytes: 10\n", []string{"firmware.max_cache_bytes: \"10\" is below 1 MiB"}},
		"firmware https addr":         {"firmware:\n  enabled: true\n  repository_url: https://x\n  trusted_root: /r\n  https_listen: x\n", []string{"bad.yaml:5: firmware.https_listen: \"x\" is not host:port"}},
		"firmware https clash":        {"firmware:\n  enabled: true\n  repository_url: https://x\n  trusted_root: /r\n  https_listen: \":8883\"\n", []string{"bad.yaml:5: firmware.https_listen: \":8883\" uses the same tcp port as mqtt.listen (:8883)"}},
		"firmware https plain":        {"firmware:\n  enabled: true\n  repository_url: https://x\n  trusted_root: /r\n  https_listen: \":80\"\n", []string{"bad.yaml:5: firmware.https_listen: \":80\" is port 80, the port of plain HTTP"}},
		"firmware https off":          {"firmware:\n  enabled: false\n  https_listen: \":8883\"\n", nil}, // not listening: no clash
		"upstream cleartext":          {"upstream:\n  enabled: true\n  broker: mqtt://cloud:1883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n", []string{"bad.yaml:3: upstream.broker: scheme \"mqtt\" is not accepted"}},
		"upstream no ca":              {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  cert_file: /c\n  key_file: /k\n", []string{"bad.yaml:1: upstream.ca_file: required"}},
		"upstream loop":               {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  uplink: [{local: \"devices/{id}/t/#\", remote: \"bastion/{gateway}/{id}/c/#\"}]\n", []string{"bad.yaml:7: upstream.uplink"}},
		"downlinks overlap":           {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  downlink:\n    - {remote: \"{prefix}/{gateway}/{id}/c/#\", local: \"devices/{id}/c/#\"}\n    - {remote: \"{prefix}/{gateway}/cmd/{id}/#\", local: \"devices/{id}/c/cmd/#\"}\n", []string{"bad.yaml:9: upstream.downlink[1].remote: \"{prefix}/{gateway}/cmd/{id}/#\" overlaps upstream.downlink[0].remote"}},
		"upstream topic levels":       {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  max_topic_levels: 3\n", []string{"bad.yaml:7: upstream.max_topic_levels: 3 is fewer than the 4 levels"}},
		"upstream device share small": {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  queue_max_bytes_per_device: 1000\n", []string{"bad.yaml:7: upstream.queue_max_bytes_per_device: \"1000\" is below 1 MiB (1048576); 0 is upstream.queue_max_bytes/8"}},
		"upstream device share large": {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  queue_max_bytes: 8388608\n  queue_max_bytes_per_device: 8388609\n", []string{"bad.yaml:8: upstream.queue_max_bytes_per_device: \"8388609\" is above upstream.queue_max_bytes (8388608): a device's share cannot be more than the queue; set it equal to have no share"}},
		"upstream device share ok":    {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  queue_max_bytes: 8388608\n  queue_max_bytes_per_device: 8388608\n", nil},
		"upstream bad key":            {"upstream:\n  brokr: x\n", []string{"bad.yaml:2: upstream.brokr: unknown key; accepted here: backoff_max, backoff_min, broker"}},
		"memory limit small":          {"log:\n  level: info\nmemory_limit: 1000\n", []string{"bad.yaml:3: memory_limit: \"1000\" is below 32 MiB (33554432)"}},
		"memory limit negative":       {"memory_limit: -2\n", []string{"bad.yaml:1: memory_limit: \"-2\" is below 32 MiB"}},
		"memory limit words":          {"memory_limit: 192MiB\n", []string{"bad.yaml:1: cannot unmarshal !!str `192MiB` into int64"}},
		"memory limit off":            {"memory_limit: -1\n", nil},
		"memory limit ok":             {"memory_limit: 134217728\n", nil},
		"pairing window short":        {"pairing:\n  window: 5s\n", []string{"bad.yaml:2: pairing.window: \"5s\" is out of range: use 10s to 15m"}},
		"pairing window long":         {"pairing:\n  window: 1h\n", []string{"bad.yaml:2: pairing.window: \"1h0m0s\" is out of range"}},
		"pairing key code":            {"pairing:\n  key_code: 4096\n", []string{"bad.yaml:2: pairing.key_code: \"4096\" is not a key code"}},
		"pairing layout":              {"pairing:\n  layout: 48\n", []string{"bad.yaml:2: pairing.layout: \"48\" is not a struct input_event layout: use auto, 64 or 32"}},
		"pairing input":               {"pairing:\n  input: button.fifo\n", []string{"bad.yaml:2: pairing.input: \"button.fifo\" is neither \"auto\""}},
		"pairing gpio chip":           {"pairing:\n  gpio_chip: gpiochip0\n", []string{"bad.yaml:2: pairing.gpio_chip: \"gpiochip0\" is not a GPIO character device"}},
		"pairing gpio no chip":        {"pairing:\n  gpio_line: 17\n", []string{"bad.yaml:2: pairing.gpio_line: \"17\" is set without pairing.gpio_chip"}},
		"pairing gpio range":          {"pairing:\n  gpio_chip: /dev/gpiochip0\n  gpio_line: 9999\n", []string{"bad.yaml:3: pairing.gpio_line: \"9999\" is out of range"}},
		"pairing vendor name":         {"pairing:\n  vendors:\n    \"bad vendor\": /etc/v.pem\n", []string{"bad.yaml:3: pairing.vendors.bad vendor: \"bad vendor\" is not a vendor name"}},
		"pairing vendor file":         {"pairing:\n  vendors:\n    acme: roots.pem\n", []string{"bad.yaml:3: pairing.vendors.acme: \"roots.pem\" is not an absolute path"}},
		"pairing unknown key":         {"pairing:\n  windw: 5s\n", []string{"bad.yaml:2: pairing.windw: unknown key; accepted here: est_listen, gpio_chip, gpio_line, input, key_code, layout, vendors, window"}},
		"pairing est clash":           {"pairing:\n  est_listen: \":8883\"\n", []string{"bad.yaml:2: pairing.est_listen: \":8883\" uses the same tcp port as mqtt.listen"}},
		"pairing est cleartext":       {"pairing:\n  est_listen: \":80\"\n", []string{"bad.yaml:2: pairing.est_listen: \":80\" is port 80, the port of plain HTTP"}},
		"pairing ok":                  {"pairing:\n  window: 15m\n  input: /dev/input/event0\n  layout: \"32\"\n  gpio_chip: /dev/gpiochip0\n  gpio_line: 17\n  vendors:\n    acme: /etc/bastion/acme.pem\n", nil},
		"two errors":                  {"log:\n  level: loud\nmqtt:\n  listen: \":1883\"\n", []string{"bad.yaml:2: log.level", "bad.yaml:4: mqtt.listen"}},
		"upstream queue bytes":        {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  queue_max_bytes: 1000\n", []string{"bad.yaml:7: upstream.queue_max_bytes: \"1000\" is below 1 MiB (1048576)"}},
		"upstream parked bytes":       {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  parked_max_bytes: 1000\n", []string{"bad.yaml:7: upstream.parked_max_bytes: \"1000\" is below 1 MiB (1048576)"}},
		"upstream queue age":          {"upstream:\n  enabled: true\n  broker: mqtts://cloud:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n  queue_max_age: 30s\n", []string{"bad.yaml:7: upstream.queue_max_age: \"30s\" is shorter than 1m"}},
		"upstream queue off":          {"upstream:\n  enabled: false\n  queue_max_bytes: 1000\n  parked_max_bytes: 1000\n  queue_max_age: 30s\n", nil}, // not forwarding: no queue to bound
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			base := Production()
			base.Firewall.LAN = []string{"br-lan"}
			_, err := Parse("bad.yaml", []byte(tc.yaml), base)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("want no error, got %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("want error containing %q, got none", tc.want)
			}
			msg := err.Error()
			lines := strings.Split(msg, "\n")
			if len(lines) != len(tc.want) {
				t.Fatalf("want %d errors, got %d:\n%s", len(tc.want), len(lines), msg)
			}
			for i, w := range tc.want {
				if !strings.Contains(lines[i], w) {
					t.Errorf("error %d:\n got %s\nwant it to contain %s", i, lines[i], w)
				}
			}
		})
	}
}

func TestValidateIsPure(t *testing.T) {
	c := Production()
	c.Log.Level = "nope"
	before := c
	_ = c.Validate()
	if diff := cmp.Diff(before, c); diff != "" {
		t.Errorf("Validate mutated config (-want +got):\n%s", diff)
	}
	var es Errors
	if err := c.Validate(); !errors.As(err, &es) || es[0].Key != "log.level" {
		t.Errorf("want Errors with key log.level, got %v", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := Load(p, Production())
	if err == nil || !strings.Contains(err.Error(), p) || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("want not-exist error naming %s, got %v", p, err)
	}
}

func TestLoadOverridesDefaults(t *testing.T) {
	c, err := Parse("ok.yaml", []byte("coap:\n  enabled: false\npki:\n  renew_before: 48h\nfirewall:\n  lan: [eth1]\n"), Production())
	if err != nil {
		t.Fatal(err)
	}
	if c.CoAP.Enabled || c.PKI.RenewBefore.D() != 48*time.Hour || !c.MQTT.Enabled || c.MQTT.Listen != ":8883" {
		t.Errorf("overrides/defaults wrong: %+v", c)
	}
}

func TestFirewallPolicyFollowsListeners(t *testing.T) {
	c := Production()
	p, err := c.FirewallPolicy()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range p.Services {
		got = append(got, fmt.Sprintf("%s %s/%d %v", s.Name, s.Proto, s.Port, s.Zones))
	}
	want := []string{"coaps udp/5684 [lan]", "coaps-psk udp/5685 [lan]", "mqtt-tls tcp/8883 [lan]", "console tcp/443 [lan]"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("services (-want +got):\n%s", diff)
	}
	// The firmware HTTPS listener is opened only while the cache is on.
	fc := Production()
	fc.Firmware.Enabled = true
	fp, err := fc.FirewallPolicy()
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, s := range fp.Services {
		got = append(got, fmt.Sprintf("%s %s/%d %v", s.Name, s.Proto, s.Port, s.Zones))
	}
	if diff := cmp.Diff(append(want, "firmware-https tcp/8444 [lan]"), got); diff != "" {
		t.Errorf("services with firmware on (-want +got):\n%s", diff)
	}
	if got := Dev(t.TempDir()).Firmware.HTTPSListen; got != "127.0.0.1:8444" {
		t.Errorf("dev firmware.https_listen = %q, want 127.0.0.1:8444", got)
	}
	if err := p.Validate(); err != nil {
		t.Errorf("default policy invalid: %v", err)
	}
	c.CoAP.Enabled, c.Console.Enabled = false, false
	p, _ = c.FirewallPolicy()
	if len(p.Services) != 1 || p.Services[0].Name != "mqtt-tls" {
		t.Errorf("turning listeners off should close their ports; services = %+v", p.Services)
	}
}

func TestMemoryLimit(t *testing.T) {
	for in, want := range map[string]int64{
		"":                         DefaultMemoryLimit,
		"memory_limit: -1\n":       -1,
		"memory_limit: 67108864\n": 64 << 20,
	} {
		base := Production()
		base.Firewall.LAN = []string{"br-lan"}
		c, err := Parse("m.yaml", []byte(in), base)
		if err != nil {
			t.Fatalf("%q: %v", in, err)
		}
		if diff := cmp.Diff(want, c.MemoryLimit); diff != "" {
			t.Errorf("memory_limit from %q (-want +got):\n%s", in, diff)
		}
	}
}

// TestForwardOnlyWhatTheFileNames: the base configuration's forward rule
// (device telemetry) is written into a new file, but a file without forward
// rules forwards nothing instead of inheriting it unseen.
func TestForwardOnlyWhatTheFileNames(t *testing.T) {
	for name, base := range map[string]Config{"production": Production(), "dev": Dev("/tmp/x")} {
		t.Run(name, func(t *testing.T) {
			if len(base.Upstream.Forward) == 0 {
				t.Fatal("the default config forwards nothing: a new file would name no rule")
			}
			var buf bytes.Buffer
			if err := WriteCommented(&buf, base); err != nil {
				t.Fatal(err)
			}
			written, err := Parse("written.yaml", buf.Bytes(), base)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(base.Upstream.Forward, written.Upstream.Forward); diff != "" {
				t.Errorf("a written default file's rules (-want +got):\n%s", diff)
			}
			c, err := Parse("bastion.yaml", []byte("upstream:\n  enabled: false\n  prefix: site\n"), base)
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Upstream.Forward) != 0 {
				t.Errorf("a file naming no forward rule forwards %v", c.Upstream.Forward)
			}
		})
	}
}

// TestUpstreamIDsFollowGatewayID: the upstream gateway id and the MQTT
// client id are derived from the file's gateway_id, not from the base's
// ("bastion", defaulted before the file was read): with the base's, every
// gateway of a fleet connected as client "bastion" (taking over each
// other's broker session) and subscribed to the same commands. A value
// the file sets is kept, and a written default file carries no copy of
// the derived values, so editing gateway_id alone is enough.
func TestUpstreamIDsFollowGatewayID(t *testing.T) {
	const up = "upstream:\n  enabled: true\n  broker: mqtts://cloud.example.com:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n"
	for name, tc := range map[string]struct {
		yaml                          string
		gateway, clientID, serverName string
	}{
		"gateway set":        {"gateway_id: gw-a\n" + up + "  gateway: gw-a\n", "gw-a", "gw-a", "cloud.example.com"},
		"gateway from id":    {"gateway_id: gw-a\n" + up, "gw-a", "gw-a", "cloud.example.com"},
		"other gateway":      {"gateway_id: gw-a\n" + up + "  gateway: site-7\n", "site-7", "site-7", "cloud.example.com"},
		"client id kept":     {"gateway_id: gw-a\n" + up + "  client_id: thing-a\n", "gw-a", "thing-a", "cloud.example.com"},
		"empty means derive": {"gateway_id: gw-a\n" + up + "  gateway: \"\"\n  client_id: \"\"\n  server_name: \"\"\n", "gw-a", "gw-a", "cloud.example.com"},
		"server name kept":   {"gateway_id: gw-a\n" + up + "  server_name: broker.internal\n", "gw-a", "gw-a", "broker.internal"},
	} {
		t.Run(name, func(t *testing.T) {
			base := Production()
			base.Firewall.LAN = []string{"br-lan"}
			c, err := Parse("bastion.yaml", []byte(tc.yaml), base)
			if err != nil {
				t.Fatal(err)
			}
			got := []string{c.Upstream.Gateway, c.Upstream.ClientID, c.Upstream.ServerName}
			if d := cmp.Diff([]string{tc.gateway, tc.clientID, tc.serverName}, got); d != "" {
				t.Errorf("upstream gateway, client_id, server_name (-want +got):\n%s", d)
			}
		})
	}

	// A written default file, with only gateway_id and the broker edited.
	for name, base := range map[string]Config{"production": Production(), "dev": Dev("/tmp/x")} {
		t.Run("written "+name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteCommented(&buf, base); err != nil {
				t.Fatal(err)
			}
			file := buf.String()
			for _, key := range []string{"  gateway: \"\"", "  client_id: \"\"", "  server_name: \"\""} {
				if !strings.Contains(file, key) {
					t.Errorf("written file lacks %q (a derived value written as itself would not follow gateway_id)", key)
				}
			}
			file = strings.Replace(file, fmt.Sprintf("gateway_id: %q", base.GatewayID), `gateway_id: "gw-b"`, 1)
			file = strings.Replace(file, "  enabled: false\n  broker: \"\"", "  enabled: true\n  broker: \"mqtts://cloud.example.com:8883\"", 1)
			for _, f := range []string{"ca_file", "cert_file", "key_file"} {
				file = strings.Replace(file, "  "+f+": \"\"", "  "+f+": /"+f, 1)
			}
			c, err := Parse("bastion.yaml", []byte(file), base)
			if err != nil {
				t.Fatalf("%v\n%s", err, file)
			}
			if !c.Upstream.Enabled {
				t.Fatalf("the edit did not turn upstream on:\n%s", file)
			}
			got := []string{c.Upstream.Gateway, c.Upstream.ClientID, c.Upstream.ServerName}
			if d := cmp.Diff([]string{"gw-b", "gw-b", "cloud.example.com"}, got); d != "" {
				t.Errorf("upstream gateway, client_id, server_name (-want +got):\n%s", d)
			}
		})
	}
}

// TestWarnOldWrittenGateway: a file written by an older
// --write-default-config says upstream.gateway: "bastion"; with only
// gateway_id edited, the gateway still connects as client "bastion" and
// shares topics with every gateway provisioned from that file. The value is
// kept (it may be meant), and a warning names the line and what to change.
// Another explicit value, the value equal to gateway_id, or the link off,
// warns of nothing.
func TestWarnOldWrittenGateway(t *testing.T) {
	const up = "upstream:\n  enabled: true\n  broker: mqtts://cloud.example.com:8883\n  ca_file: /ca\n  cert_file: /c\n  key_file: /k\n"
	for name, tc := range map[string]struct {
		yaml string
		line int // of the warning; 0: none
	}{
		"old written file":   {"gateway_id: gw-a\n" + up + "  gateway: \"bastion\"\n", 8},
		"other value":        {"gateway_id: gw-a\n" + up + "  gateway: site-7\n", 0},
		"same as gateway_id": {"gateway_id: bastion\n" + up + "  gateway: bastion\n", 0},
		"derived":            {"gateway_id: gw-a\n" + up, 0},
		"upstream off":       {"gateway_id: gw-a\nupstream:\n  enabled: false\n  gateway: bastion\n", 0},
		"explicit client id": {"gateway_id: gw-a\n" + up + "  gateway: bastion\n  client_id: gw-a\n", 8},
	} {
		t.Run(name, func(t *testing.T) {
			base := Production()
			base.Firewall.LAN = []string{"br-lan"}
			c, ws, err := ParseWithWarnings("bastion.yaml", []byte(tc.yaml), base)
			if err != nil {
				t.Fatal(err)
			}
			if tc.line == 0 {
				if len(ws) != 0 {
					t.Errorf("warnings %v, want none", ws)
				}
				return
			}
			if c.Upstream.Gateway != "bastion" {
				t.Errorf("upstream.gateway %q, want the file's \"bastion\" kept", c.Upstream.Gateway)
			}
			if len(ws) != 1 {
				t.Fatalf("warnings %v, want one", ws)
			}
			w := ws[0].Error()
			for _, s := range []string{"bastion.yaml:8: upstream.gateway:", `is "bastion" while gateway_id is "gw-a"`, `set upstream.gateway: "" to follow gateway_id`, "bastion/bastion/+/c/#"} {
				if !strings.Contains(w, s) {
					t.Errorf("warning %q lacks %q", w, s)
				}
			}
			if got, want := strings.Contains(w, `connects as MQTT client id "bastion"`), c.Upstream.ClientID == "bastion"; got != want {
				t.Errorf("warning %q names the client id %v, want %v (client_id %q)", w, got, want, c.Upstream.ClientID)
			}
		})
	}
}

// FirewallPolicy maps every firewall key onto the policy: the zones in
// the order lan, wan with their interfaces in the file's order, the
// listeners' services and then the extra ones, the ping zones and the
// forward rules.
func TestFirewallPolicyFromConfig(t *testing.T) {
	c, err := Parse("ok.yaml", []byte("firewall:\n  lan: [eth1, wlan+]\n  wan: [eth0]\n  ping: [lan]\n  forward:\n    - {from: lan, to: wan, proto: tcp, port: 443}\n    - {from: lan, to: wan}\n"), Production())
	if err != nil {
		t.Fatal(err)
	}
	c.CoAP.Enabled, c.Console.Enabled = false, false
	est := firewall.Service{Name: "est", Proto: firewall.TCP, Port: 8445, Zones: []string{firewall.ZoneLAN}}
	got, err := c.FirewallPolicy(est)
	if err != nil {
		t.Fatal(err)
	}
	want := firewall.Policy{
		Zones: []firewall.Zone{{Name: "lan", Interfaces: []string{"eth1", "wlan+"}}, {Name: "wan", Interfaces: []string{"eth0"}}},
		Services: []firewall.Service{
			{Name: "mqtt-tls", Proto: firewall.TCP, Port: 8883, Zones: []string{"lan"}, Handshake: true},
			est,
		},
		HandshakeRate: firewall.Rate{Count: 20, Per: time.Second, Burst: 40},
		Ping:          []string{"lan"},
		Forward:       []firewall.ForwardRule{{From: "lan", To: "wan", Proto: firewall.TCP, Port: 443}, {From: "lan", To: "wan"}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("policy (-want +got):\n%s", diff)
	}
}

// The lan and wan interfaces are checked in that order, every time: an
// interface in both is reported at its wan entry, and the errors of one
// file come in the same order at each load (the zones were walked in a
// map's random order).
func TestInterfaceErrorsInFileOrder(t *testing.T) {
	const file = "firewall:\n  lan: [eth0, \"lan:1\"]\n  wan: [eth0, \"wan:1\"]\n"
	want := []string{
		`bad.yaml:2: firewall.lan[1]: zone lan: interface "lan:1"`,
		`bad.yaml:3: firewall.wan[0]: "eth0" is in both lan and wan`,
		`bad.yaml:3: firewall.wan[1]: zone wan: interface "wan:1"`,
	}
	for i := range 50 {
		_, err := Parse("bad.yaml", []byte(file), Production())
		if err == nil {
			t.Fatal("no error")
		}
		lines := strings.Split(err.Error(), "\n")
		if len(lines) != len(want) {
			t.Fatalf("load %d: %d errors, want %d:\n%s", i, len(lines), len(want), err)
		}
		for j, w := range want {
			if !strings.HasPrefix(lines[j], w) {
				t.Fatalf("load %d, error %d:\n got %s\nwant %s...", i, j, lines[j], w)
			}
		}
	}
}

// Two firmware URLs that are not https:// are reported in the file's
// order at every load (they were checked in a map's random order).
func TestFirmwareURLErrorsInOrder(t *testing.T) {
	const file = "firmware:\n  enabled: true\n  repository_url: http://r\n  targets_url: http://t\n  trusted_root: /r.json\n"
	want := "bad.yaml:3: firmware.repository_url: \"http://r\" is not an https:// URL: firmware is fetched over HTTPS only\n" +
		"bad.yaml:4: firmware.targets_url: \"http://t\" is not an https:// URL: firmware is fetched over HTTPS only"
	for i := range 50 {
		_, err := Parse("bad.yaml", []byte(file), Production())
		if err == nil || err.Error() != want {
			t.Fatalf("load %d:\n got %v\nwant %s", i, err, want)
		}
	}
}

// TestDevListenDefaults: `bastiond --dev` is documented (README, devicesim's
// defaults, docs) as listening on these loopback ports; a change here breaks
// every developer's tools and must be made on purpose.
func TestDevListenDefaults(t *testing.T) {
	c := Dev(t.TempDir())
	got := map[string]string{
		"coap.listen":           c.CoAP.Listen,
		"coap.psk_listen":       c.CoAP.PSKListen,
		"mqtt.listen":           c.MQTT.Listen,
		"console.listen":        c.Console.Listen,
		"firmware.https_listen": c.Firmware.HTTPSListen,
	}
	want := map[string]string{
		"coap.listen":           "127.0.0.1:5684",
		"coap.psk_listen":       "127.0.0.1:5685",
		"mqtt.listen":           "127.0.0.1:8883",
		"console.listen":        "127.0.0.1:8443",
		"firmware.https_listen": "127.0.0.1:8444",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("dev listeners (-want +got):\n%s", d)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("the dev configuration does not validate: %v", err)
	}
}

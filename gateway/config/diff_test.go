package config

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/bridges/upstream"
)

func TestChangedKeys(t *testing.T) {
	tests := map[string]struct {
		change func(*Config)
		want   []string
	}{
		"nothing":         {func(*Config) {}, nil},
		"top level":       {func(c *Config) { c.GatewayID = "other" }, []string{"gateway_id"}},
		"section key":     {func(c *Config) { c.MQTT.Listen = ":8884" }, []string{"mqtt.listen"}},
		"duration":        {func(c *Config) { c.Firmware.CheckInterval = Duration(time.Hour) }, []string{"firmware.check_interval"}},
		"inline link key": {func(c *Config) { c.Upstream.Broker = "mqtts://cloud:8883" }, []string{"upstream.broker"}},
		"map is one key":  {func(c *Config) { c.Pairing.Vendors = map[string]string{"acme": "a.pem", "b": "b.pem"} }, []string{"pairing.vendors"}},
		"list is one key": {func(c *Config) {
			c.Upstream.Forward = append(c.Upstream.Forward, upstream.Rule{Topic: "x", Action: "local"})
		}, []string{"upstream.forward"}},
		"empty is absent":  {func(c *Config) { c.Firewall.WAN = []string{} }, nil},
		"several in order": {func(c *Config) { c.Metrics.Listen = "127.0.0.1:9100"; c.CoAP.PSKListen = "" }, []string{"coap.psk_listen", "metrics.listen"}},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			a := Production()
			a.Pairing.Vendors = map[string]string{"acme": "a.pem"}
			b := Production()
			b.Pairing.Vendors = map[string]string{"acme": "a.pem"}
			tt.change(&b)
			if d := cmp.Diff(tt.want, ChangedKeys(a, b)); d != "" {
				t.Errorf("ChangedKeys (-want +got):\n%s", d)
			}
		})
	}
}

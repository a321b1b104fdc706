package gateway

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
)

// TestCommandsOnlyForKnownDevices: a command from the cloud reaches the
// transports only for a device of this gateway that is not revoked; one
// for an id that does not exist, or for a revoked device, is refused (the
// upstream link counts and logs it) and never kept.
func TestCommandsOnlyForKnownDevices(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, d := range []store.Device{{ID: "dev-ok", Name: "ok", Auth: "cert"}, {ID: "dev-gone", Name: "gone", Auth: "cert"}} {
		if err := s.AddDevice(d); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Revoke("dev-gone", time.Now()); err != nil {
		t.Fatal(err)
	}
	g := &Gateway{store: s, log: slog.New(slog.DiscardHandler)}
	g.cfg.Store(&config.Config{CoAP: config.CoAP{Enabled: true, MaxPayload: 1024}, MQTT: config.MQTT{Enabled: true, MaxPacketSize: 64 << 10}})
	var got []string
	g.setDownlink(func(_ context.Context, m bridges.Message) error {
		got = append(got, m.Device)
		return nil
	})
	ctx := context.Background()
	cmd := func(dev string) error {
		return g.deliverCommand(ctx, bridges.Message{Device: dev, Topic: "devices/" + dev + "/c/x", QoS: 1, Payload: []byte("on")})
	}
	if err := cmd("dev-ok"); err != nil {
		t.Fatalf("command for a device of this gateway: %v", err)
	}
	if err := cmd("dev-nope"); !errors.Is(err, errNoSuchDevice) {
		t.Errorf("command for an unknown id: %v, want errNoSuchDevice", err)
	}
	if err := cmd("dev-gone"); err == nil {
		t.Error("command for a revoked device was delivered")
	}
	if len(got) != 1 || got[0] != "dev-ok" {
		t.Errorf("the transports got commands for %v, want only dev-ok", got)
	}
}

// TestCommandsBeyondTransportsRefused: a command from the cloud whose
// payload is larger than any enabled device transport carries is refused
// with upstream.ErrCommandTooLarge (the link counts it result="too_large"
// and logs it, spaced) and never reaches the transports, where it would be
// kept in memory as its topic's last command. The link takes commands of
// up to 256 KiB; the transports carry what they take from devices: MQTT a
// PUBLISH within mqtt.max_packet_size, CoAP coap.max_payload (at least one
// notification, 1024 bytes); the larger of the enabled ones.
//
// Mutation that fails it: the size check in deliverCommand removed (every
// "over" case is delivered).
func TestCommandsBeyondTransportsRefused(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.AddDevice(store.Device{ID: "dev-ok", Name: "ok", Auth: "cert"}); err != nil {
		t.Fatal(err)
	}
	const topic = "devices/dev-ok/c/config"
	mqttLimit := func(packet int) int { return packet - mqttPublishOverhead - len(topic) }
	for _, c := range []struct {
		name  string
		coap  *config.CoAP
		mqtt  *config.MQTT
		limit int
	}{
		{"both, defaults", &config.CoAP{Enabled: true, MaxPayload: 1024}, &config.MQTT{Enabled: true, MaxPacketSize: 64 << 10}, mqttLimit(64 << 10)},
		{"CoAP alone", &config.CoAP{Enabled: true, MaxPayload: 1024}, nil, 1024},
		{"CoAP alone, small max_payload", &config.CoAP{Enabled: true, MaxPayload: 256}, nil, 1024},
		{"CoAP alone, max_payload 4096", &config.CoAP{Enabled: true, MaxPayload: 4096}, nil, 4096},
		{"MQTT alone, 2 KiB packets", nil, &config.MQTT{Enabled: true, MaxPacketSize: 2048}, mqttLimit(2048)},
		{"CoAP's 16 KiB over MQTT's 2 KiB", &config.CoAP{Enabled: true, MaxPayload: 16384}, &config.MQTT{Enabled: true, MaxPacketSize: 2048}, 16384},
		{"none", nil, nil, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var cfg config.Config
			if c.coap != nil {
				cfg.CoAP = *c.coap
			}
			if c.mqtt != nil {
				cfg.MQTT = *c.mqtt
			}
			g := &Gateway{store: s, log: slog.New(slog.DiscardHandler)}
			g.cfg.Store(&cfg)
			var got []int
			g.setDownlink(func(_ context.Context, m bridges.Message) error {
				got = append(got, len(m.Payload))
				return nil
			})
			cmd := func(n int) error {
				return g.deliverCommand(context.Background(), bridges.Message{Device: "dev-ok", Topic: topic, QoS: 1, Payload: make([]byte, n)})
			}
			if c.limit > 0 {
				if err := cmd(c.limit); err != nil {
					t.Fatalf("a command of %d bytes, the limit: %v", c.limit, err)
				}
			}
			for _, n := range []int{c.limit + 1, 256 << 10} {
				if err := cmd(n); !errors.Is(err, upstream.ErrCommandTooLarge) {
					t.Errorf("a command of %d bytes (limit %d): %v, want ErrCommandTooLarge", n, c.limit, err)
				}
			}
			want := []int{}
			if c.limit > 0 {
				want = []int{c.limit}
			}
			if len(got) != len(want) || len(got) > 0 && got[0] != want[0] {
				t.Errorf("the transports got commands of %v bytes, want %v", got, want)
			}
		})
	}
}

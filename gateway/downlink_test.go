package gateway

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
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

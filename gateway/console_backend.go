package gateway

import (
	"context"
	"errors"
	"sort"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway/console"
)

// consoleBackend gives the console what it needs from the gateway, through
// console.Gateway, so that the console never imports this package.
type consoleBackend struct{ g *Gateway }

var (
	_ console.Gateway     = consoleBackend{}
	_ console.Argon2Slots = consoleBackend{}
)

func (b consoleBackend) Health(ctx context.Context) console.Health {
	s := b.g.Status()
	// The control socket's path means nothing over the web.
	delete(s.Listeners, "control")
	return console.Health{Version: s.Version, GatewayID: s.GatewayID, Mode: s.Mode, Uptime: s.Uptime, ClockSane: s.ClockSane,
		Listeners: s.Listeners, Devices: s.Devices, RevokedDevices: s.RevokedDevices, Components: s.Components}
}

func (b consoleBackend) Certificates(ctx context.Context) []console.CertStatus {
	info := b.g.PKIInfo()
	out := []console.CertStatus{
		{Name: "root CA", Serial: info.Root.Serial, NotAfter: info.Root.NotAfter},
		{Name: "issuing CA", Serial: info.Issuer.Serial, NotAfter: info.Issuer.NotAfter},
	}
	for n, c := range info.Servers {
		out = append(out, console.CertStatus{Name: "server " + n, Serial: c.Serial, NotAfter: c.NotAfter})
	}
	certs, _ := b.g.store.Certs()
	for _, c := range certs {
		out = append(out, console.CertStatus{Name: "device " + c.Device, Serial: c.Serial, NotAfter: c.NotAfter, Revoked: c.Revoked})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].NotAfter.Before(out[j].NotAfter) })
	return out
}

// AcquireArgon2 and ReleaseArgon2 give the console's password hashing the
// slots of the device secret checks: one bound for the box's argon2id
// runs, not one each.
func (b consoleBackend) AcquireArgon2(ctx context.Context) error { return b.g.secrets.acquire(ctx) }
func (b consoleBackend) ReleaseArgon2()                          { b.g.secrets.release() }

func (b consoleBackend) CheckSetupCode(code string) bool { return b.g.CheckSetupCode(code) }

// badRequest marks the device service's request errors for the console.
type badRequest struct{ error }

func (badRequest) BadRequest() bool { return true }
func (e badRequest) Unwrap() error  { return e.error }

func consoleErr(err error) error {
	if errors.Is(err, ErrBadRequest) {
		return badRequest{err}
	}
	return err
}

func (b consoleBackend) AddDevice(ctx context.Context, req console.DeviceRequest, who console.Actor) (console.Credentials, error) {
	c, err := b.g.devices.Add(AddRequest{Name: req.Name, Auth: req.Auth, CSR: req.CSR, Vendor: req.Vendor, Model: req.Model},
		Actor{Name: who.Name, Remote: who.Remote})
	if err != nil {
		return console.Credentials{}, consoleErr(err)
	}
	return console.Credentials{ID: c.ID, Name: c.Name, Auth: c.Auth, PSKIdentity: c.PSKIdentity, PSK: c.PSK,
		CoAPSPort: c.CoAPSPort, CertPEM: c.CertPEM, CAPEM: c.CAPEM, Secret: c.Secret}, nil
}

func (b consoleBackend) RevokeDevice(ctx context.Context, id string, who console.Actor) error {
	_, err := b.g.devices.Revoke(id, Actor{Name: who.Name, Remote: who.Remote})
	return consoleErr(err)
}

// DropRetained deletes the device's retained MQTT messages from the
// broker and the store, or from the store alone with MQTT off (it may
// hold some from a run with it on).
func (b consoleBackend) DropRetained(ctx context.Context, id string) (int, error) {
	if b.g.mqtt != nil {
		return b.g.mqtt.DropRetained(id)
	}
	return b.g.store.DeleteRetainedUnder(bridges.TopicPrefix(id))
}

// Console returns the console handler (nil when the console is disabled).
// Components fill its optional parts with SetComponents before Run.
func (g *Gateway) Console() *console.Handler { return g.consoleHandler }

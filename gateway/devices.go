package gateway

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/pki"
)

// Devices is the one place devices are added, listed and revoked; the
// control socket, the console and pairing all go through it, so every
// change is audited the same way.
type Devices struct {
	store       *store.Store
	ca          *pki.CA
	log         *slog.Logger
	validity    func() time.Duration
	pskCoAPPort func() int
}

// Credentials are what a newly added device needs; returned once, never
// stored in clear.
type Credentials struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	Auth        string `json:"auth"`
	PSKIdentity string `json:"psk_identity,omitempty"`
	PSK         string `json:"psk,omitempty"`      // hex of the key bytes
	PSKText     string `json:"psk_text,omitempty"` // the same key bytes as text (they are printable)
	CoAPSPort   int    `json:"coaps_port,omitempty"`
	CertPEM     string `json:"cert_pem,omitempty"`
	CAPEM       string `json:"ca_pem,omitempty"`
	Secret      string `json:"secret,omitempty"` // MQTT secret login
}

// AddRequest describes a device added by an integrator.
type AddRequest struct {
	Name   string `json:"name"`
	Auth   string `json:"auth"` // psk, cert or secret
	CSR    string `json:"csr,omitempty"`
	Vendor string `json:"vendor,omitempty"`
	Model  string `json:"model,omitempty"`
}

// Actor says who asked for a change, for the audit log.
type Actor struct {
	Name   string // "bastionctl", an admin's user name, "button"
	Remote string
}

// ErrBadRequest marks errors caused by the request, not the gateway.
var ErrBadRequest = errors.New("bad request")

func validName(n string) bool {
	if len(n) == 0 || len(n) > 64 {
		return false
	}
	for _, r := range n {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// Add creates a device and returns its credentials.
func (d *Devices) Add(req AddRequest, who Actor) (Credentials, error) {
	if !validName(req.Name) {
		return Credentials{}, fmt.Errorf("%w: device name %q: use 1-64 printable characters", ErrBadRequest, req.Name)
	}
	now := d.ca.Clock().Now()
	dev := store.Device{ID: pki.NewDeviceID(), Name: req.Name, Auth: req.Auth, Vendor: req.Vendor, Model: req.Model, Created: now}
	creds := Credentials{ID: dev.ID, Name: dev.Name, Auth: dev.Auth}
	var cert string
	switch req.Auth {
	case "psk":
		dev.PSKIdentity = pki.NewPSKIdentity()
		creds.PSKIdentity = dev.PSKIdentity
		key := d.ca.PSK(dev.PSKIdentity)
		creds.PSK = hex.EncodeToString(key)
		creds.PSKText = string(key)
		creds.CoAPSPort = d.pskCoAPPort()
	case "cert":
		csr, err := pki.ParseCSR([]byte(req.CSR))
		if err != nil {
			return Credentials{}, fmt.Errorf("%w: %v", ErrBadRequest, err)
		}
		c, err := d.ca.IssueDevice(csr, dev.ID, d.validity())
		if err != nil {
			return Credentials{}, err
		}
		cert = pki.Serial(c)
		creds.CertPEM = string(pki.CertPEM(c))
		creds.CAPEM = string(d.ca.ChainPEM())
		if err := d.store.RecordCert(store.Cert{Serial: cert, Device: dev.ID, NotAfter: c.NotAfter}); err != nil {
			return Credentials{}, err
		}
	case "secret":
		secret := make([]byte, 18)
		salt := make([]byte, 16)
		rand.Read(secret)
		rand.Read(salt)
		creds.Secret = hex.EncodeToString(secret)
		dev.SecretHash = HashSecret([]byte(creds.Secret), salt)
		creds.CAPEM = string(d.ca.ChainPEM())
	default:
		return Credentials{}, fmt.Errorf("%w: auth %q: use psk, cert or secret", ErrBadRequest, req.Auth)
	}
	if err := d.store.AddDevice(dev); err != nil {
		if errors.Is(err, store.ErrNameTaken) {
			return Credentials{}, fmt.Errorf("%w: %v", ErrBadRequest, err)
		}
		return Credentials{}, err
	}
	d.audit(who, "device.add", dev.ID, "name="+strconv.Quote(dev.Name)+" auth="+dev.Auth)
	d.log.Info("device added", "device", dev.ID, "name", dev.Name, "auth", dev.Auth, "by", who.Name)
	return creds, nil
}

// Revoke revokes a device: its certificates and PSK stop working for the
// next handshake at once, and open sessions are closed.
func (d *Devices) Revoke(id string, who Actor) (store.Device, error) {
	dev, err := d.store.Revoke(id, d.ca.Clock().Now())
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return store.Device{}, fmt.Errorf("%w: no device with id %q (see bastionctl device list)", ErrBadRequest, id)
		}
		return store.Device{}, err
	}
	certs, err := d.store.Certs()
	if err != nil {
		return store.Device{}, err
	}
	for _, c := range certs {
		if c.Device == id {
			d.ca.Revocations().RevokeSerial(c.Serial)
		}
	}
	d.ca.Revocations().RevokeDevice(id)
	d.audit(who, "device.revoke", id, "")
	d.log.Info("device revoked", "device", id, "by", who.Name)
	return dev, nil
}

// List returns every device.
func (d *Devices) List() ([]store.Device, error) { return d.store.Devices() }

// loadRevocations fills the CA's revocation set from the store at start,
// after deleting the records of renewed certificates that have expired.
func (d *Devices) loadRevocations() error {
	now := d.ca.Clock().Now()
	pruned := 0
	for more := true; more; {
		var n int
		var err error
		if n, more, err = d.store.PruneRetiredCerts(now); err != nil {
			return err
		}
		pruned += n
	}
	if pruned > 0 {
		d.log.Info("records of expired renewed certificates deleted", "certificates", pruned)
	}
	devs, err := d.store.Devices()
	if err != nil {
		return err
	}
	for _, dev := range devs {
		if dev.Revoked {
			d.ca.Revocations().RevokeDevice(dev.ID)
		}
	}
	certs, err := d.store.Certs()
	if err != nil {
		return err
	}
	for _, c := range certs {
		if c.Revoked {
			d.ca.Revocations().RevokeSerial(c.Serial)
		} else if !c.RetireAt.IsZero() && !c.NotAfter.Before(now) {
			// An expired one is refused as such: no entry needed.
			d.ca.Revocations().RetireCert(c.Serial, c.RetireAt, c.NotAfter)
		}
	}
	return nil
}

func (d *Devices) audit(who Actor, action, target, detail string) {
	if _, err := d.store.Audit(store.Event{Time: d.ca.Clock().Now(), Actor: who.Name, Remote: who.Remote, Action: action, Target: target, Detail: detail}); err != nil {
		d.log.Error("audit log write failed", "action", action, "err", err)
	}
}

package gateway

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"sort"
	"time"

	"github.com/bastion-iot/bastion/internal/buildinfo"
	"github.com/bastion-iot/bastion/pki"
)

// Status is what `bastionctl status` and the console dashboard show.
type Status struct {
	Version           string            `json:"version"`
	GatewayID         string            `json:"gateway_id"`
	Mode              string            `json:"mode"`
	StartedAt         time.Time         `json:"started_at"`
	Uptime            string            `json:"uptime"`
	ClockSane         bool              `json:"clock_sane"`
	Listeners         map[string]string `json:"listeners"`
	Devices           int               `json:"devices"`
	RevokedDevices    int               `json:"revoked_devices"`
	AdminSetupPending bool              `json:"admin_setup_pending"`
	Components        map[string]any    `json:"components,omitempty"`
}

// statusProviders lets components (upstream, firewall, firmware) add their
// part of the status.
func (g *Gateway) addStatus(name string, f func() any) {
	g.statusMu.Lock()
	defer g.statusMu.Unlock()
	if g.statusProviders == nil {
		g.statusProviders = map[string]func() any{}
	}
	g.statusProviders[name] = f
}

// Status reports the gateway's state.
func (g *Gateway) Status() Status {
	s := Status{
		Version:   buildinfo.Version,
		GatewayID: g.cfg.Load().GatewayID,
		Mode:      "production",
		StartedAt: g.started,
		Uptime:    time.Since(g.started).Round(time.Second).String(),
		ClockSane: g.clock.Sane() == nil,
		Listeners: g.Addrs(),
	}
	if g.opts.Dev {
		s.Mode = "dev"
	}
	ds, _ := g.store.Devices()
	for _, d := range ds {
		if d.Revoked {
			s.RevokedDevices++
		} else {
			s.Devices++
		}
	}
	_, err := g.store.Meta(metaAdminExists)
	s.AdminSetupPending = err != nil
	g.statusMu.Lock()
	defer g.statusMu.Unlock()
	if len(g.statusProviders) > 0 {
		s.Components = map[string]any{}
		for n, f := range g.statusProviders {
			s.Components[n] = f()
		}
	}
	return s
}

// CertInfo describes one certificate for display.
type CertInfo struct {
	Subject  string    `json:"subject"`
	Serial   string    `json:"serial"`
	SHA256   string    `json:"sha256"`
	NotAfter time.Time `json:"not_after"`
	SANs     []string  `json:"sans,omitempty"`
}

// PKIInfo is what `bastionctl pki show` prints.
type PKIInfo struct {
	Root         CertInfo            `json:"root"`
	Issuer       CertInfo            `json:"issuer"`
	Servers      map[string]CertInfo `json:"servers"`
	DeviceCerts  int                 `json:"device_certs"`
	RevokedCerts int                 `json:"revoked_certs"`
	ExpiringSoon []string            `json:"expiring_soon,omitempty"` // device cert serials within 30 days
}

func certInfo(c *x509.Certificate) CertInfo {
	sum := sha256.Sum256(c.Raw)
	ci := CertInfo{Subject: c.Subject.CommonName, Serial: pki.Serial(c), SHA256: hex.EncodeToString(sum[:]), NotAfter: c.NotAfter}
	ci.SANs = append(ci.SANs, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		ci.SANs = append(ci.SANs, ip.String())
	}
	for _, u := range c.URIs {
		ci.SANs = append(ci.SANs, u.String())
	}
	return ci
}

// PKIInfo describes the CA and the certificates in use.
func (g *Gateway) PKIInfo() PKIInfo {
	info := PKIInfo{Root: certInfo(g.ca.Root()), Issuer: certInfo(g.ca.Issuer()), Servers: map[string]CertInfo{}}
	for n, lc := range g.certs {
		info.Servers[n] = certInfo(lc.cert.Leaf())
	}
	certs, _ := g.store.Certs()
	soon := g.clock.Now().Add(30 * 24 * time.Hour)
	for _, c := range certs {
		info.DeviceCerts++
		if c.Revoked {
			info.RevokedCerts++
		} else if c.NotAfter.Before(soon) {
			info.ExpiringSoon = append(info.ExpiringSoon, c.Serial)
		}
	}
	sort.Strings(info.ExpiringSoon)
	return info
}

package gateway

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/bastion-iot/bastion/gateway/config"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

// firmwareDevices tells the firmware cache which device classes are enrolled
// and what each device runs, from the store.
type firmwareDevices struct{ g *Gateway }

func (f firmwareDevices) Device(id string) (otacache.DeviceInfo, bool) {
	d, err := f.g.store.Device(id)
	if err != nil || d.Revoked || d.Vendor == "" || d.Model == "" {
		return otacache.DeviceInfo{}, false
	}
	return otacache.DeviceInfo{Class: otacache.Class{Vendor: d.Vendor, Model: d.Model}, Version: d.Version}, true
}

func (f firmwareDevices) Classes() ([]otacache.Class, error) {
	ds, err := f.g.store.Devices()
	if err != nil {
		return nil, fmt.Errorf("device list: %w", err)
	}
	seen := map[otacache.Class]bool{}
	var out []otacache.Class
	for _, d := range ds {
		c := otacache.Class{Vendor: d.Vendor, Model: d.Model}
		if d.Revoked || c.Vendor == "" || c.Model == "" || seen[c] {
			continue
		}
		seen[c] = true
		out = append(out, c)
	}
	return out, nil
}

// openFirmware builds the firmware cache from the configuration. Reading the
// trust anchor and keys happens here, not in Validate, which does no I/O.
func (g *Gateway) openFirmware(cfg config.Config) error {
	f := cfg.Firmware
	if !f.Enabled {
		return nil
	}
	root, err := os.ReadFile(f.TrustedRoot)
	if err != nil {
		return fmt.Errorf("firmware.trusted_root: %w (it must be the vendor's root.json)", err)
	}
	hc, err := firmwareHTTPClient(f)
	if err != nil {
		return err
	}
	keys := map[string]crypto.PublicKey{}
	for vendor, file := range f.VendorKeys {
		b, err := os.ReadFile(file)
		if err != nil {
			return fmt.Errorf("firmware.vendor_keys.%s: %w", vendor, err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return fmt.Errorf("firmware.vendor_keys.%s: %s holds no PEM public key", vendor, file)
		}
		k, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return fmt.Errorf("firmware.vendor_keys.%s: %w", vendor, err)
		}
		keys[vendor] = k
	}
	g.firmware, err = otacache.New(otacache.Config{
		RepositoryURL: f.RepositoryURL,
		TargetsURL:    f.TargetsURL,
		TrustedRoot:   root,
		StateDir:      filepath.Join(cfg.StateDir, "firmware"),
		HTTPClient:    hc,
		CheckInterval: f.CheckInterval.D(),
		MaxCacheBytes: f.MaxCacheBytes,
		VendorKeys:    keys,
		Now:           g.clock.Now,
		StatusStore:   fwStatusStore{g}, // survives a restart unless opted out
	}, firmwareDevices{g}, g.log) // logs as component=ota-cache
	if err != nil {
		return err
	}
	g.offers = newOfferQueue()
	g.addStatus("firmware", func() any { return g.firmware.Status() })
	if err := g.metrics.reg.Register(newFirmwareCollector(g.firmware)); err != nil {
		return fmt.Errorf("firmware: register metrics: %w", err)
	}
	return nil
}

// Bounds on the vendor's server (firmwareHTTPClient).
const (
	fwMetadataTimeout       = 5 * time.Minute
	fwResponseHeaderTimeout = time.Minute
	// fwMaxRedirects is more than a CDN uses (one or two hops) and fewer
	// than net/http's default of 10.
	fwMaxRedirects = 5
)

// firmwareHTTPClient is the client for the vendor's update server, trusting
// firmware.ca_bundle if set (else the system roots), with pki's outbound
// TLS profile. Its Timeout bounds each TUF metadata file
// only: otacache gives an image download no overall timeout (at 1-5 Mbit/s
// an image of 40-190 MiB would never complete in 5 minutes) and ends one
// that receives nothing for its StallTimeout. ResponseHeaderTimeout gives
// up on a server that takes a request and never answers it.
func firmwareHTTPClient(f config.Firmware) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = fwResponseHeaderTimeout
	var roots *x509.CertPool // nil: the system roots
	if f.CABundle != "" {
		pemBytes, err := os.ReadFile(f.CABundle)
		if err != nil {
			return nil, fmt.Errorf("firmware.ca_bundle: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("firmware.ca_bundle %s: no PEM certificate in it", f.CABundle)
		}
	}
	// The outbound profile, TLS 1.2 allowed: a vendor's CDN may not speak
	// 1.3, but it gets no CBC suite either.
	tr.TLSClientConfig = pki.TLSClient(roots, "", true)
	return &http.Client{Timeout: fwMetadataTimeout, Transport: tr, CheckRedirect: fwCheckRedirect}, nil
}

// fwCheckRedirect follows a redirect only to another https:// URL, and at
// most fwMaxRedirects of them. Validate requires https:// for the
// vendor's URLs; without this a server (or whoever took over a name it
// redirects to) could move every metadata and image fetch to plain HTTP,
// where anyone on the path sees which device models' firmware the gateway
// fetches, and can stall or replace it (TUF still refuses a replacement).
func fwCheckRedirect(req *http.Request, via []*http.Request) error {
	// net/http's error names req.URL already.
	if req.URL.Scheme != "https" {
		return fmt.Errorf("the firmware server redirected %s to this %s:// URL: refused, firmware is fetched over HTTPS only; have the vendor fix the redirect, or set firmware.repository_url/targets_url to the final https:// location",
			via[len(via)-1].URL.Redacted(), req.URL.Scheme)
	}
	if len(via) >= fwMaxRedirects {
		return fmt.Errorf("the firmware server redirected %s %d times: stopped (a loop, or more redirects than a CDN makes)", via[0].URL.Redacted(), len(via))
	}
	return nil
}

func (g *Gateway) controlFirmware(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/firmware", func(w http.ResponseWriter, r *http.Request) {
		if g.firmware == nil {
			writeErr(w, fmt.Errorf("%w: the firmware cache is off (firmware.enabled: false)", ErrBadRequest))
			return
		}
		devs := g.firmware.DeviceStatuses()
		if g.optedOut(optOutFwStatus) {
			devs = nil // not shown: the firmware.status privacy opt-out is on
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": g.firmware.Status(), "devices": devs})
	})
	mux.HandleFunc("POST /v1/firmware/check", func(w http.ResponseWriter, r *http.Request) {
		if g.firmware == nil {
			writeErr(w, fmt.Errorf("%w: the firmware cache is off (firmware.enabled: false)", ErrBadRequest))
			return
		}
		err := g.firmware.Check(r.Context())
		g.devices.audit(ctlActor, "firmware.check", "", errString(err))
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": g.firmware.Status()})
	})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

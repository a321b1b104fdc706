package otacache

import (
	"crypto"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"
)

// Config describes one vendor update repository and the local cache.
type Config struct {
	// RepositoryURL is the https:// base URL of the vendor's TUF metadata
	// (root.json, timestamp.json ... live directly under it).
	RepositoryURL string
	// TargetsURL is the base URL of the target files; default
	// RepositoryURL + "/targets".
	TargetsURL string
	// TrustedRoot is the vendor's root.json as shipped in the gateway's
	// configuration. It is the only trust anchor: nothing is ever trusted on
	// first download.
	TrustedRoot []byte
	// StateDir holds metadata/ (the TUF client's trusted metadata),
	// images/ (verified images named by sha256) and state.json. Created 0700.
	StateDir string
	// HTTPClient fetches metadata and images; its TLS config decides which
	// server certificates are trusted. Nil means a client with the system
	// roots. Its Timeout bounds each metadata file only: an image download
	// has no overall timeout (a large image over a slow uplink would never
	// complete), it fails after StallTimeout without a byte.
	HTTPClient *http.Client
	// StallTimeout fails an image download that receives nothing for this
	// long, from the request on (default 1m).
	StallTimeout time.Duration
	// CheckInterval between automatic checks (default 6h); each wait is
	// moved by a uniformly random amount in [-CheckJitter, +CheckJitter]
	// (default CheckInterval/10) so that a fleet of gateways does not hit
	// the vendor at the same second.
	CheckInterval time.Duration
	CheckJitter   time.Duration
	// MaxCacheBytes bounds the images kept on disk (default 1 GiB).
	MaxCacheBytes int64
	// MaxImageBytes refuses any single target larger than this
	// (default 256 MiB).
	MaxImageBytes int64
	// VendorKeys optionally holds vendors' manifest keys (vendor → ed25519
	// or ECDSA public key). When a vendor's key is present the gateway also
	// verifies the COSE signature before it offers the image; devices
	// verify it in any case.
	VendorKeys map[string]crypto.PublicKey
	// EvictGrace keeps the open file of an evicted image readable for
	// transfers already in progress (default 10m).
	EvictGrace time.Duration
	// Now is the clock (default time.Now); tests move it to judge expiry.
	Now func() time.Time
	// StatusStore, if set, keeps devices' latest status reports across
	// restarts (written only when a device's status changes, in batches).
	// Nil keeps them in memory only.
	StatusStore StatusStore
}

func (c *Config) setDefaults() {
	if c.TargetsURL == "" && c.RepositoryURL != "" {
		c.TargetsURL = c.RepositoryURL + "/targets"
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Timeout: 10 * time.Minute}
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = time.Minute
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = 6 * time.Hour
	}
	if c.CheckJitter == 0 {
		c.CheckJitter = c.CheckInterval / 10
	}
	if c.MaxCacheBytes == 0 {
		c.MaxCacheBytes = 1 << 30
	}
	if c.MaxImageBytes == 0 {
		c.MaxImageBytes = 256 << 20
	}
	if c.EvictGrace == 0 {
		c.EvictGrace = 10 * time.Minute
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Validate checks a defaulted config without I/O.
func (c Config) Validate() error {
	var errs []error
	for _, u := range []struct{ key, val string }{{"repository_url", c.RepositoryURL}, {"targets_url", c.TargetsURL}} {
		p, err := url.Parse(u.val)
		if err != nil || p.Scheme != "https" || p.Host == "" {
			errs = append(errs, fmt.Errorf("ota.%s %q: want an https:// URL with a host (firmware is never fetched in clear)", u.key, u.val))
		}
	}
	if len(c.TrustedRoot) == 0 {
		errs = append(errs, errors.New("ota.trusted_root: the vendor's root.json is required (Bastion never trusts a root on first download)"))
	}
	if c.StateDir == "" {
		errs = append(errs, errors.New("ota.state_dir: required"))
	}
	if c.StallTimeout < 0 {
		errs = append(errs, fmt.Errorf("ota.stall_timeout %v: want a positive duration", c.StallTimeout))
	}
	if c.CheckInterval < time.Minute {
		errs = append(errs, fmt.Errorf("ota.check_interval %v: want at least 1m", c.CheckInterval))
	}
	if c.CheckJitter < 0 || c.CheckJitter >= c.CheckInterval {
		errs = append(errs, fmt.Errorf("ota.check_jitter %v: want 0 <= jitter < check_interval (%v)", c.CheckJitter, c.CheckInterval))
	}
	if c.MaxImageBytes <= 0 || c.MaxCacheBytes < c.MaxImageBytes {
		errs = append(errs, fmt.Errorf("ota.max_cache_bytes %d, ota.max_image_bytes %d: want 0 < max_image_bytes <= max_cache_bytes", c.MaxCacheBytes, c.MaxImageBytes))
	}
	for v, k := range c.VendorKeys {
		if _, err := coseAlg(k); err != nil {
			errs = append(errs, fmt.Errorf("ota.vendor_keys[%s]: %w", v, err))
		}
	}
	return errors.Join(errs...)
}

package otacache

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Offer tells one device that an update for it is ready. It is what the
// CoAP Observe resource and the MQTT topic carry (as JSON).
type Offer struct {
	Device   string `json:"device"`
	Class    Class  `json:"class"`
	Version  string `json:"version"`
	Sequence uint64 `json:"sequence"`
	Size     int64  `json:"size"`
	SHA256   string `json:"sha256"`
	// Manifest is the vendor's COSE_Sign1 over the manifest, exactly as
	// the vendor published it in TUF; the device verifies it with the
	// vendor key it was built with.
	Manifest []byte `json:"manifest"`
	// Path is the download path on the gateway (CoAPS and HTTPS):
	// /fw/sha256/{sha256}. It names the content, so a transfer resumed
	// later gets the same bytes or an error, never a mix.
	Path string `json:"path"`
}

// Offer returns the update the device should install, if any: the newest
// verified image of its class, only when it is newer than the version the
// device reports (or reported installed), and never while the vendor
// metadata is expired.
func (c *Cache) Offer(device string) (Offer, bool) {
	img, info, err := c.imageFor(device, FirmwareRef{})
	if err != nil {
		return Offer{}, false
	}
	if dv, err := c.deviceVersion(device, info); err == nil && img.ver.Compare(dv) <= 0 {
		return Offer{}, false
	}
	return Offer{
		Device: device, Class: img.tc.Class(), Version: img.tc.Version, Sequence: img.tc.Sequence,
		Size: img.size, SHA256: img.sha, Manifest: img.tc.Manifest, Path: "/fw/sha256/" + img.sha,
	}, true
}

// deviceVersion is the newer of what the gateway knows and what the device
// itself last reported as installed.
func (c *Cache) deviceVersion(device string, info DeviceInfo) (Version, error) {
	v, err := ParseVersion(info.Version)
	c.mu.RLock()
	st, ok := c.statuses[device]
	c.mu.RUnlock()
	if ok && st.State == StateInstalled {
		if rv, rerr := ParseVersion(st.Version); rerr == nil && (err != nil || rv.Compare(v) > 0) {
			return rv, nil
		}
	}
	return v, err
}

// serveError is a refusal with the status a transport should answer.
type serveError struct {
	kind int // one of errForbidden, errNotFound, errUnavailable
	msg  string
}

const (
	errForbidden = iota + 1
	errNotFound
	errUnavailable
)

func (e *serveError) Error() string { return e.msg }

// imageFor authorises device for ref and returns the image to serve. An
// empty ref means "the current image of the device's class".
func (c *Cache) imageFor(device string, ref FirmwareRef) (*image, DeviceInfo, error) {
	info, ok := c.devices.Device(device)
	if !ok {
		return nil, info, &serveError{errForbidden, fmt.Sprintf("device %q is not enrolled", device)}
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return nil, info, &serveError{errUnavailable, "firmware cache is closed"}
	}
	if !c.st.ValidUntil.After(c.cfg.Now()) {
		return nil, info, &serveError{errUnavailable, "vendor update metadata expired or not yet fetched: no firmware is served until it is fresh"}
	}
	var img *image
	switch {
	case ref.SHA256 != "":
		img = c.current[info.Class]
		if img != nil && img.sha == ref.SHA256 {
			break
		}
		// Every blob held is some class's current image.
		var others []string
		for cl, o := range c.current {
			if o.sha == ref.SHA256 {
				others = append(others, cl.String())
			}
		}
		if len(others) == 0 {
			return nil, info, &serveError{errNotFound, "no verified image with sha256 " + ref.SHA256}
		}
		slices.Sort(others)
		return nil, info, &serveError{errForbidden, fmt.Sprintf("image %s is for class %s, device %q is %s", ref.SHA256, strings.Join(others, ", "), device, info.Class)}
	default:
		if ref.Class != (Class{}) && ref.Class != info.Class {
			return nil, info, &serveError{errForbidden, fmt.Sprintf("device %q is class %s, not %s", device, info.Class, ref.Class)}
		}
		img = c.current[info.Class]
		if img == nil {
			return nil, info, &serveError{errNotFound, "no verified image for class " + info.Class.String()}
		}
	}
	return img, info, nil
}

// imageForServe adds the rollback rule to imageFor: a device never
// downloads an image older than what it runs.
func (c *Cache) imageForServe(device string, ref FirmwareRef) (*image, error) {
	img, info, err := c.imageFor(device, ref)
	if err != nil {
		return nil, err
	}
	if dv, err := c.deviceVersion(device, info); err == nil && img.ver.Compare(dv) < 0 {
		return nil, &serveError{errForbidden, fmt.Sprintf("image version %s is older than the %s device %q runs", img.tc.Version, info.Version, device)}
	}
	return img, nil
}

// FirmwareRef is a parsed download path: either a class or a sha256.
type FirmwareRef struct {
	Class  Class
	SHA256 string
}

// isSHA256Hex reports whether s is 64 lower-case hex digits. (Not a
// regexp: it runs for every firmware block served.)
func isSHA256Hex(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// ParseFirmwarePath parses "/fw/sha256/{hex}" or "/fw/{vendor}/{model}"
// (a leading slash is optional; CoAP Uri-Path arrives without one).
func ParseFirmwarePath(p string) (FirmwareRef, error) {
	if len(p) > 200 {
		return FirmwareRef{}, fmt.Errorf("firmware path of %d bytes: too long", len(p))
	}
	segs := strings.Split(strings.TrimPrefix(p, "/"), "/")
	if len(segs) != 3 || segs[0] != "fw" {
		return FirmwareRef{}, fmt.Errorf("firmware path %q: want /fw/sha256/{sha256} or /fw/{vendor}/{model}", p)
	}
	if segs[1] == "sha256" {
		if !isSHA256Hex(segs[2]) {
			return FirmwareRef{}, fmt.Errorf("firmware path %q: want 64 lower-case hex digits after /fw/sha256/", p)
		}
		return FirmwareRef{SHA256: segs[2]}, nil
	}
	cl := Class{Vendor: segs[1], Model: segs[2]}
	if err := cl.Validate(); err != nil {
		return FirmwareRef{}, fmt.Errorf("firmware path %q: %w", p, err)
	}
	return FirmwareRef{Class: cl}, nil
}

// etag is the CoAP ETag (8 bytes of the sha256) of an image, decoded
// once when the image was opened (every block carries it).
func (img *blob) etag() []byte { return img.tag[:] }

// Update states a device reports.
const (
	StateDownloading = "downloading"
	StateVerified    = "verified"
	StateInstalling  = "installing"
	StateInstalled   = "installed"
	StateFailed      = "failed"
)

var knownStates = map[string]bool{StateDownloading: true, StateVerified: true, StateInstalling: true, StateInstalled: true, StateFailed: true}

// DeviceStatus is a device's update status report, as sent by the device
// (JSON) and shown on the console.
type DeviceStatus struct {
	State   string `json:"state"`
	Version string `json:"version,omitempty"`
	SHA256  string `json:"sha256,omitempty"`
	// Detail is a short free text, e.g. why verification failed.
	Detail string `json:"detail,omitempty"`
	// At is set by the gateway when the report arrives.
	At time.Time `json:"at,omitzero"`
}

// ParseStatusReport decodes a device's status report strictly.
func ParseStatusReport(b []byte) (DeviceStatus, error) {
	var st DeviceStatus
	if len(b) > 1024 {
		return st, fmt.Errorf("status report of %d bytes: more than 1024", len(b))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		return st, fmt.Errorf("status report: %w", err)
	}
	if dec.More() {
		return st, errors.New("status report: trailing data")
	}
	st.At = time.Time{}
	return st, st.validate()
}

func (st DeviceStatus) validate() error {
	if !knownStates[st.State] {
		return fmt.Errorf("status report: state %q: want downloading, verified, installing, installed or failed", st.State)
	}
	if st.Version != "" {
		if _, err := ParseVersion(st.Version); err != nil {
			return fmt.Errorf("status report: %w", err)
		}
	}
	if st.State == StateInstalled && st.Version == "" {
		return errors.New("status report: state installed needs the installed version")
	}
	if st.SHA256 != "" && !isSHA256Hex(st.SHA256) {
		return errors.New("status report: sha256 must be 64 lower-case hex digits")
	}
	if len(st.Detail) > 256 {
		return errors.New("status report: detail longer than 256 bytes")
	}
	for _, r := range st.Detail {
		if r < 0x20 || r == 0x7f {
			return errors.New("status report: detail has control characters")
		}
	}
	return nil
}

// ReportStatus records a device's update status for the console. An
// "installed" report raises the version the device is considered to run,
// so the same image is not offered again. With a Config.StatusStore it
// returns once a changed status is stored.
func (c *Cache) ReportStatus(device string, st DeviceStatus) error {
	if _, ok := c.devices.Device(device); !ok {
		return fmt.Errorf("status report from %q: device not enrolled", device)
	}
	if err := st.validate(); err != nil {
		return fmt.Errorf("status report from %q: %w", device, err)
	}
	st.At = c.cfg.Now()
	var b *statusBatch
	c.mu.Lock()
	// Checked again under c.mu, which ForgetDevice takes: an erase that
	// revoked the device and forgot its status since the check above
	// would otherwise have it brought back, in memory and in the store.
	// Revoked before it is forgotten, the device is refused here, or
	// its report is written before ForgetDevice deletes it. (Devices must
	// not call the cache: it is called with c.mu held.)
	info, ok := c.devices.Device(device)
	if !ok {
		c.mu.Unlock()
		return fmt.Errorf("status report from %q: device not enrolled", device)
	}
	prev, had := c.statuses[device]
	c.statuses[device] = st
	// Only a change is written: a device repeating its report wears no
	// flash (the stored At is then when the status last changed). A report
	// whose write failed is written again with the next one.
	if c.sw != nil && (!had || !prev.sameReport(st) || c.unsaved[device]) {
		v, _ := json.Marshal(st)
		b = c.sw.enqueue(device, v)
		delete(c.unsaved, device)
	}
	c.mu.Unlock()
	if st.State == StateInstalled {
		c.notify([]Class{info.Class})
	}
	if b != nil {
		if err := c.sw.wait(b); err != nil {
			c.mu.Lock()
			c.unsaved[device] = true
			c.mu.Unlock()
			return fmt.Errorf("status report from %q taken but %w: %w", device, errStatusNotStored, err)
		}
	}
	return nil
}

// DeviceStatuses returns the last report of every device that sent one.
func (c *Cache) DeviceStatuses() map[string]DeviceStatus {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return maps.Clone(c.statuses)
}

package console

import (
	"context"
	"time"
)

// The console never imports the gateway (the gateway imports the console).
// It sees the rest of the box through the small interfaces below, which the
// gateway fills. A nil optional component is shown as "not available in
// this build" and its API answers 501.

// Gateway is what the console needs from the composition root. Required.
type Gateway interface {
	// Health is the dashboard's summary.
	Health(ctx context.Context) Health
	// Certificates lists the gateway's own and the devices' certificates
	// with their expiry, soonest first.
	Certificates(ctx context.Context) []CertStatus
	// CheckSetupCode reports whether code is the current one-time
	// first-admin setup code.
	CheckSetupCode(code string) bool
	// AddDevice creates a device and returns its credentials (shown once).
	AddDevice(ctx context.Context, req DeviceRequest, who Actor) (Credentials, error)
	// RevokeDevice revokes a device at once (certificates, PSK, sessions).
	RevokeDevice(ctx context.Context, id string, who Actor) error
	// DropRetained deletes a device's retained MQTT messages (on topics
	// under devices/{id}/) from the running broker and the store, and
	// returns how many it deleted.
	DropRetained(ctx context.Context, id string) (int, error)
}

// Argon2Slots is an optional part of Gateway: a bound on the argon2id runs
// of the whole box (19 MiB each), which the gateway's device secret checks
// take too. A Gateway that has one shares it with the console's password
// hashing, so that logins and device checks together stay within it;
// without one, the console bounds its own runs to 2.
type Argon2Slots interface {
	// AcquireArgon2 waits for a slot until ctx ends.
	AcquireArgon2(ctx context.Context) error
	// ReleaseArgon2 gives back a slot AcquireArgon2 took.
	ReleaseArgon2()
}

// Actor says who asked for a change, for the audit log.
type Actor struct {
	Name   string
	Remote string
}

// Health is the gateway's state as the dashboard shows it.
type Health struct {
	Version        string            `json:"version"`
	GatewayID      string            `json:"gateway_id"`
	Mode           string            `json:"mode"`
	Uptime         string            `json:"uptime"`
	ClockSane      bool              `json:"clock_sane"`
	Listeners      map[string]string `json:"listeners"`
	Devices        int               `json:"devices"`
	RevokedDevices int               `json:"revoked_devices"`
	// Components holds what other parts (upstream, firewall, firmware)
	// report about themselves, by name.
	Components map[string]any `json:"components,omitempty"`
}

// CertStatus is one certificate and when it expires.
type CertStatus struct {
	Name     string    `json:"name"` // "root", "issuer", "server console", "device <id>"
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	Revoked  bool      `json:"revoked,omitempty"`
}

// DeviceRequest asks for a pre-provisioned device.
type DeviceRequest struct {
	Name   string `json:"name"`
	Auth   string `json:"auth"` // psk, cert or secret
	CSR    string `json:"csr,omitempty"`
	Vendor string `json:"vendor,omitempty"`
	Model  string `json:"model,omitempty"`
}

// Credentials are returned once when a device is added.
type Credentials struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	Auth        string `json:"auth"`
	PSKIdentity string `json:"psk_identity,omitempty"`
	PSK         string `json:"psk,omitempty"`
	CoAPSPort   int    `json:"coaps_port,omitempty"`
	CertPEM     string `json:"cert_pem,omitempty"`
	CAPEM       string `json:"ca_pem,omitempty"`
	Secret      string `json:"secret,omitempty"`
}

// BadRequestError marks a Gateway error caused by the request (shown to the
// user as is, answered with 400).
type BadRequestError interface{ BadRequest() bool }

// Pairing shows the pairing window. It has no method that opens the
// window: only the button on the box does that.
type Pairing interface {
	Window(ctx context.Context) (PairingWindow, error)
	// History returns recent pairing attempts, newest first.
	History(ctx context.Context, limit int) ([]PairingEvent, error)
}

// PairingWindow is the window's state.
type PairingWindow struct {
	Open      bool      `json:"open"`
	OpenedBy  string    `json:"opened_by,omitempty"` // "button", "gpio"
	Closes    time.Time `json:"closes,omitzero"`
	Attempts  int       `json:"attempts"`
	Available bool      `json:"available"` // false: no button source in this build
}

// PairingEvent is one pairing attempt.
type PairingEvent struct {
	Time   time.Time `json:"time"`
	Device string    `json:"device,omitempty"`
	Method string    `json:"method"` // idevid, setup-code
	Result string    `json:"result"`
}

// Report is a titled list of sections; components whose details the
// console does not need to understand (firewall rules, firmware cache,
// upstream link) describe themselves this way.
type Report struct {
	Sections []Section `json:"sections"`
}

// Section is part of a Report: key/value rows, a table, and/or
// preformatted text (e.g. iptables-save output).
type Section struct {
	Title  string      `json:"title"`
	Rows   [][2]string `json:"rows,omitempty"`
	Header []string    `json:"header,omitempty"`
	Table  [][]string  `json:"table,omitempty"`
	Pre    string      `json:"pre,omitempty"`
	Alarm  string      `json:"alarm,omitempty"` // non-empty: shown as an alarm on the dashboard
}

// Firmware is the verified firmware cache.
type Firmware interface {
	Show(ctx context.Context) (Report, error)
	// CheckNow asks the TUF client to check the repository now.
	CheckNow(ctx context.Context, who Actor) error
	// ForgetDevice deletes a device's update status (memory and store):
	// the device's data is being erased.
	ForgetDevice(ctx context.Context, device string) error
}

// Firewall shows the policy, the live rules and drift events.
type Firewall interface {
	Show(ctx context.Context) (Report, error)
}

// Upstream shows the cloud link: broker, certificate, status, topic
// mapping. Forwarding rules are in the store (store.ForwardRules), which the
// upstream link reads.
type Upstream interface {
	Show(ctx context.Context) (Report, error)
}

// Traffic gives per-device counters and last-seen times from the bridges.
type Traffic interface {
	Counters(ctx context.Context, device string) (DeviceCounters, bool)
}

// DeviceCounters are one device's traffic counters.
type DeviceCounters struct {
	MessagesIn  uint64    `json:"messages_in"`
	MessagesOut uint64    `json:"messages_out"`
	BytesIn     uint64    `json:"bytes_in"`
	BytesOut    uint64    `json:"bytes_out"`
	Refused     uint64    `json:"refused"`
	LastSeen    time.Time `json:"last_seen,omitzero"`
}

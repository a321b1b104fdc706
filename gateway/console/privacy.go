package console

import (
	"context"
	"time"
)

// Datum is one kind of data Bastion collects or forwards: what, why, where
// it goes, how long it is kept, and whether it may be switched off. The
// list is the privacy statement; the console page and GET /api/v1/privacy
// both show it, so the human- and machine-readable forms cannot differ.
type Datum struct {
	ID        string `json:"id"`
	What      string `json:"what"`
	Why       string `json:"why"`
	Where     string `json:"where"`
	Retention string `json:"retention"`
	// Optional data can be switched off (opt-out); the rest is needed for
	// the gateway to do its job.
	Optional bool `json:"optional"`
	OptedOut bool `json:"opted_out"`
}

// Catalogue is Bastion's privacy statement. Extra collection is off by
// default: nothing optional here is forwarded unless a forwarding rule
// names it.
var Catalogue = []Datum{
	{ID: "device.identity", What: "device id, name, authentication kind, vendor, model, certificate serials",
		Why: "to authenticate each device and show it to you", Where: "stays on the gateway (state directory)",
		Retention: "until the device's data is deleted; the id and revoked serials are kept after deletion so old credentials stay refused"},
	{ID: "device.last_seen", What: "time a device last sent telemetry",
		Why: "health view", Where: "stays on the gateway (memory)",
		Retention: "until restart; deleted with the device's data; opting out erases it and keeps none", Optional: true},
	{ID: "device.counters", What: "message and byte counters per device",
		Why: "troubleshooting and spotting misbehaving devices", Where: "stays on the gateway (memory)",
		Retention: "until restart; opting out erases them and keeps none", Optional: true},
	{ID: "telemetry", What: "messages devices publish (devices/{id}/t/...)",
		Why: "the purpose of the gateway: deliver them to your cloud", Where: "upstream broker, only for topics a forwarding rule names (forward, or redact fields first); local-only topics never leave",
		Retention: "queued on the gateway only until the broker acknowledges them (bounded by size and age); one the broker refuses for good is parked on the gateway until an operator retries or drops it; a device's queued and parked messages are deleted with its data"},
	{ID: "device.retained", What: "the last retained MQTT message a device published on each of its topics (devices/{id}/...)",
		Why: "MQTT retained messages: a local client subscribing later gets the device's latest value", Where: "stays on the gateway (state directory and the MQTT broker's memory); sent to local MQTT subscribers of the topic",
		Retention: "until the device replaces or clears it, at most an hour after it was published (the broker's message expiry); deleted from the state directory with the device's data, the broker's copy with it"},
	{ID: "commands", What: "commands sent to devices (devices/{id}/c/...)",
		Why: "to control devices", Where: "from the upstream broker or local clients to the device",
		Retention: "the last command on each of a device's command topics (at most 16 topics per device, 4 MiB in all) is kept in memory, never on disk, and given to the device when it asks over CoAP (a GET or a new observe of the topic), until a newer command replaces it, the gateway restarts, or the device is revoked or its data deleted"},
	{ID: "audit.remote_address", What: "IP address and user name of each console action and login attempt",
		Why: "security: who did what, when, from where", Where: "stays on the gateway (audit log)",
		Retention: "kept as the security record: the newest 10,000 events of the audit log, each new one deleting the oldest beyond them; not forwarded"},
	{ID: "admin.accounts", What: "console user names, roles, argon2id password hashes, session and token hashes",
		Why: "to let only you administer the box", Where: "stays on the gateway",
		Retention: "until the account is deleted; sessions end after 30 min idle or 12 h"},
	{ID: "firmware.status", What: "firmware update status devices report",
		Why: "to show which devices are up to date", Where: "stays on the gateway; over MQTT devices send it as a message on devices/{id}/s/fw, which goes upstream only if a forwarding rule names that topic and this is not opted out",
		Retention: "latest report per device, kept across restarts (written only when it changes); deleted with the device's data; opting out erases the stored reports, and reports are then neither stored, shown nor sent upstream (held in memory only so an installed image is not offered again)", Optional: true},
	{ID: "firmware.check", What: "requests to the firmware vendor's update repository (firmware.repository_url): its signed metadata, and the images of the device classes (vendor and model) enrolled on this box, only those",
		Why: "to offer devices verified firmware updates", Where: "the vendor's repository server, which sees this box's public IP address, when it checks (every firmware.check_interval, default 6 h, and on demand) and, from the images it fetches, which device classes are enrolled; its name is looked up through the network's DNS servers. Only with firmware.enabled",
		Retention: "on the gateway, the verified metadata and images in the state directory until replaced or no longer needed by an enrolled class; at the vendor, as the vendor keeps its server logs"},
	{ID: "time.sync", What: "NTP requests for the current time (systemd-timesyncd, in the appliance image)",
		Why: "certificates and the audit log need a correct clock", Where: "the NTP servers the network's DHCP names, otherwise Debian's pool (0-3.debian.pool.ntp.org, looked up through the network's DNS servers); they see this box's public IP address and that it asks for the time",
		Retention: "nothing kept on the gateway but the clock; at the servers, as their operators keep their logs"},
}

func datumByID(id string) (Datum, bool) {
	for _, d := range Catalogue {
		if d.ID == id {
			return d, true
		}
	}
	return Datum{}, false
}

func (h *Handler) privacy() ([]Datum, error) {
	off, err := h.o.Store.OptOuts()
	out := make([]Datum, len(Catalogue))
	for i, d := range Catalogue {
		d.OptedOut = d.Optional && off[d.ID]
		out[i] = d
	}
	return out, err
}

// UpstreamQueues is an optional part of Upstream: a device's telemetry the
// upstream link holds for the cloud, in its queue (waiting to be sent) and
// its parking queue (refused by the broker for good, kept until an
// operator retries or drops them). The export lists it and the erase
// deletes it: parked messages are kept for years and listed with their
// device, and queued ones would reach the cloud after the erase.
type UpstreamQueues interface {
	// DeviceMessages returns how many of device's messages each queue
	// holds, and the first of them (queued ones first), at most max
	// messages and about maxBytes of payload.
	DeviceMessages(ctx context.Context, device string, max, maxBytes int) (UpstreamMessages, error)
	// DropDevice deletes device's messages from both queues and returns
	// how many it deleted from each.
	DropDevice(ctx context.Context, device string) (queued, parked int, err error)
}

// UpstreamMessages is a device's telemetry the upstream link holds.
type UpstreamMessages struct {
	Queued int `json:"queued"`
	Parked int `json:"parked"`
	// Messages are the first of them; Truncated says there are more.
	Messages  []UpstreamMessage `json:"messages"`
	Truncated bool              `json:"truncated,omitempty"`
}

// UpstreamMessage is one message the upstream link holds.
type UpstreamMessage struct {
	Queue    string    `json:"queue"` // "queued" or "parked"
	Topic    string    `json:"topic"`
	Received time.Time `json:"received"`
	QoS      byte      `json:"qos"`
	Payload  []byte    `json:"payload"`           // base64 in JSON
	Refused  string    `json:"refused,omitempty"` // parked: why the broker refused it
}

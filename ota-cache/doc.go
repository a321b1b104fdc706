// Package otacache fetches firmware from a vendor's TUF repository, keeps
// only verified images, and serves them download-only to local devices.
//
// It owns the TUF client state (trusted metadata, anti-rollback sequence
// floors), the content-addressed image cache under its state directory,
// device offers and update status reports, and the CoAP and HTTP handlers
// for /fw/. It also carries the device-side helpers (fetch, verify, report)
// used by cmd/devicesim.
//
// It never signs firmware, never trusts a root.json it was not configured
// with, never serves an image it has not verified, and never accepts any
// method but GET on /fw/. It opens no listener: the transports (bridges/)
// authenticate devices and pass the device identity in.
package otacache

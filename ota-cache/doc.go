// Package otacache fetches firmware from a vendor's TUF repository, keeps
// only verified images, and serves them download-only to local devices.
package otacache

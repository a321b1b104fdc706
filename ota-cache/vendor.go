package otacache

import (
	"crypto"
	"crypto/sha256"
	"fmt"
)

// VendorTargetCustom is the vendor's side of publishing an image: it signs
// the manifest of data for class cl with key (SignManifest) and returns the
// target's custom metadata ({"bastion": {...}}) to put in targets.json. The
// gateway never calls it; tests and demo repositories do.
func VendorTargetCustom(cl Class, version string, seq uint64, data []byte, key crypto.Signer) (map[string]any, error) {
	sum := sha256.Sum256(data)
	man, err := SignManifest(Manifest{ManifestVersion: 1, SequenceNumber: seq, VendorID: cl.Vendor, ClassID: cl.Model,
		Version: version, ImageSize: int64(len(data)), ImageDigest: sum[:]}, key)
	if err != nil {
		return nil, fmt.Errorf("vendor target %s %s: %w", cl, version, err)
	}
	return map[string]any{"bastion": TargetCustom{Vendor: cl.Vendor, Model: cl.Model, Version: version, Sequence: seq, Manifest: man}}, nil
}

package gateway

import (
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// TestFirmwareHTTPClient: the vendor client trusts firmware.ca_bundle and
// gives up on a server that never answers; its Timeout (which otacache
// applies to metadata only) is not what bounds an image download.
func TestFirmwareHTTPClient(t *testing.T) {
	repo := tufrepo.New(t)
	bundle := filepath.Join(t.TempDir(), "vendor-ca.pem")
	if err := os.WriteFile(bundle, repo.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	hc, err := firmwareHTTPClient(config.Firmware{CABundle: bundle})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hc.CloseIdleConnections)
	resp, err := hc.Get(repo.URL() + "/1.root.json")
	if err != nil {
		t.Fatalf("GET from the vendor's server with its CA bundle: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET root.json: %s", resp.Status)
	}
	tr, ok := hc.Transport.(*http.Transport)
	if !ok || tr.ResponseHeaderTimeout != fwResponseHeaderTimeout {
		t.Errorf("transport %T: want an *http.Transport with ResponseHeaderTimeout %v", hc.Transport, fwResponseHeaderTimeout)
	}
	if hc.Timeout != fwMetadataTimeout {
		t.Errorf("Timeout %v, want %v (each metadata file)", hc.Timeout, fwMetadataTimeout)
	}
}

// TestFirmwareDevicesClassesError: a device list that cannot be read is an
// error for the firmware cache, not an empty list (which would evict every
// cached image).
func TestFirmwareDevicesClassesError(t *testing.T) {
	s, err := store.Open(filepath.Join(t.TempDir(), "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []store.Device{
		{ID: "a1", Name: "a1", Auth: "cert", Vendor: "acme", Model: "th-10"},
		{ID: "a2", Name: "a2", Auth: "cert", Vendor: "acme", Model: "th-10"},
		{ID: "b1", Name: "b1", Auth: "cert", Vendor: "globex", Model: "plug-2"},
		{ID: "x", Name: "x", Auth: "cert"},
	} {
		if err := s.AddDevice(d); err != nil {
			t.Fatal(err)
		}
	}
	fd := firmwareDevices{g: &Gateway{store: s}}
	got, err := fd.Classes()
	sort.Slice(got, func(i, j int) bool { return got[i].String() < got[j].String() })
	if d := cmp.Diff([]otacache.Class{fwClassA, fwClassB}, got); err != nil || d != "" {
		t.Errorf("Classes() = %v (-want +got):\n%s", err, d)
	}
	s.Close()
	if got, err := fd.Classes(); err == nil {
		t.Errorf("Classes() with the store closed = %v, nil; want an error", got)
	}
}

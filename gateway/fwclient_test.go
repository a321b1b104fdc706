package gateway

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
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

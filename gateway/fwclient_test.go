package gateway

import (
	"crypto/tls"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
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

// TestFirmwareHTTPClientRedirects: the vendor client follows a redirect to
// another https:// URL, refuses one to http:// (nothing reaches the
// plain-HTTP server) with an error that says why, and stops a redirect
// loop after fwMaxRedirects.
func TestFirmwareHTTPClientRedirects(t *testing.T) {
	var plainHits atomic.Int32
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plainHits.Add(1)
		io.WriteString(w, "{}")
	}))
	defer plain.Close()
	var loops atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/ok.json", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") })
	mux.HandleFunc("/moved.json", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ok.json", http.StatusFound) })
	mux.HandleFunc("/to-http.json", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, plain.URL+"/1.root.json", http.StatusFound)
	})
	mux.HandleFunc("/loop.json", func(w http.ResponseWriter, r *http.Request) {
		// A loop that ends, so that a client with no bound fails fast.
		if loops.Add(1) > 20 {
			io.WriteString(w, "{}")
			return
		}
		http.Redirect(w, r, "/loop.json", http.StatusFound)
	})
	srv := httptest.NewTLSServer(mux)
	defer srv.Close()
	bundle := filepath.Join(t.TempDir(), "vendor-ca.pem")
	if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	hc, err := firmwareHTTPClient(config.Firmware{CABundle: bundle})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hc.CloseIdleConnections)

	resp, err := hc.Get(srv.URL + "/moved.json")
	if err != nil {
		t.Fatalf("https redirect to https: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Request.URL.Path != "/ok.json" {
		t.Errorf("https redirect to https: %s at %s, want 200 at /ok.json", resp.Status, resp.Request.URL)
	}

	resp, err = hc.Get(srv.URL + "/to-http.json")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("https redirect to %s followed: %s", plain.URL, resp.Status)
	}
	if !strings.Contains(err.Error(), "firmware is fetched over HTTPS only") {
		t.Errorf("redirect to http: error %q, want one saying firmware is fetched over HTTPS only", err)
	}
	if n := plainHits.Load(); n != 0 {
		t.Errorf("the plain-HTTP server got %d requests, want none", n)
	}

	resp, err = hc.Get(srv.URL + "/loop.json")
	if err == nil {
		resp.Body.Close()
		t.Fatal("a redirect loop ended without an error")
	}
	if n := loops.Load(); n != fwMaxRedirects {
		t.Errorf("a redirect loop made %d requests, want %d (fwMaxRedirects)", n, fwMaxRedirects)
	}
}

// TestFirmwareHTTPClientSuites: with firmware.ca_bundle, the vendor client
// refuses a TLS 1.2 server that offers only a CBC suite and fetches from
// one that offers an ECDHE AEAD suite (httptest's key is RSA, as many
// CDNs' are). Without a bundle it has the same profile over the system
// roots.
func TestFirmwareHTTPClientSuites(t *testing.T) {
	for _, tc := range []struct {
		suite uint16
		ok    bool
	}{
		{tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, false},
		{tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA, false},
		{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, true},
		{tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305, true},
	} {
		t.Run(tls.CipherSuiteName(tc.suite), func(t *testing.T) {
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") }))
			srv.TLS = &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tc.suite}}
			srv.StartTLS()
			defer srv.Close()
			bundle := filepath.Join(t.TempDir(), "vendor-ca.pem")
			if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
				t.Fatal(err)
			}
			hc, err := firmwareHTTPClient(config.Firmware{CABundle: bundle})
			if err != nil {
				t.Fatal(err)
			}
			defer hc.CloseIdleConnections()
			resp, err := hc.Get(srv.URL + "/1.root.json")
			if err != nil {
				if tc.ok {
					t.Errorf("GET from a TLS 1.2 server offering only %s: %v", tls.CipherSuiteName(tc.suite), err)
				} else if !strings.Contains(err.Error(), "handshake failure") {
					t.Errorf("GET from a TLS 1.2 server offering only %s: %v; want the server's handshake_failure alert (no suite in common)", tls.CipherSuiteName(tc.suite), err)
				}
				return
			}
			resp.Body.Close()
			if !tc.ok {
				t.Fatalf("GET from a TLS 1.2 server offering only %s succeeded; want it refused", tls.CipherSuiteName(tc.suite))
			}
			if got := resp.TLS.CipherSuite; got != tc.suite {
				t.Errorf("negotiated %s, want %s", tls.CipherSuiteName(got), tls.CipherSuiteName(tc.suite))
			}
		})
	}

	hc, err := firmwareHTTPClient(config.Firmware{})
	if err != nil {
		t.Fatal(err)
	}
	tr := hc.Transport.(*http.Transport)
	want := pki.TLSClient(nil, "", true)
	c := tr.TLSClientConfig
	if c == nil {
		t.Fatal("without firmware.ca_bundle: no TLS config, so crypto/tls's default suites (CBC among them)")
	}
	if c.RootCAs != nil || c.MinVersion != want.MinVersion || !slices.Equal(c.CipherSuites, want.CipherSuites) || !slices.Equal(c.CurvePreferences, want.CurvePreferences) {
		t.Errorf("without firmware.ca_bundle: roots %v, min version %x, suites %v, curves %v; want the system roots and pki.TLSClient's %x, %v, %v",
			c.RootCAs, c.MinVersion, c.CipherSuites, c.CurvePreferences, want.MinVersion, want.CipherSuites, want.CurvePreferences)
	}
}

package otacache

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/plgd-dev/go-coap/v3/message"
)

// The fuzz seeds in testdata/ are real encoder output: target custom
// metadata as the test repository publishes it, COSE manifests from
// SignManifest, status reports from MarshalStatusReport, and request
// paths as devices send them. OTACACHE_WRITE_TESTDATA=1 regenerates them.

func TestWriteTestdata(t *testing.T) {
	if os.Getenv("OTACACHE_WRITE_TESTDATA") != "1" {
		t.Skip("set OTACACHE_WRITE_TESTDATA=1 to regenerate the fuzz seeds in testdata/")
	}
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	write := func(name string, b []byte) {
		p := filepath.Join("testdata", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("manifest/vendor.pub", pub)
	for i, m := range []Manifest{
		{ManifestVersion: 1, SequenceNumber: 42, VendorID: "acme", ClassID: "th-10", Version: "1.4.2", ImageSize: 16 << 20},
		{ManifestVersion: 1, SequenceNumber: 1, VendorID: "globex", ClassID: "plug-2", Version: "2", ImageSize: 1},
	} {
		sum := sha256.Sum256([]byte(m.Version))
		m.ImageDigest = sum[:]
		signed, err := SignManifest(m, priv)
		if err != nil {
			t.Fatal(err)
		}
		write("manifest/"+string(rune('a'+i))+".cose", signed)
		custom, _ := json.Marshal(map[string]any{"bastion": TargetCustom{Vendor: m.VendorID, Model: m.ClassID, Version: m.Version, Sequence: m.SequenceNumber, Manifest: signed}, "vendor-notes": "kept"})
		write("custom/"+string(rune('a'+i))+".json", custom)
	}
	for i, st := range []DeviceStatus{
		{State: StateDownloading},
		{State: StateInstalled, Version: "1.4.2", SHA256: strings.Repeat("ab", 32)},
		{State: StateFailed, Version: "1.4.2", Detail: "manifest signature does not verify"},
	} {
		b, err := MarshalStatusReport(st)
		if err != nil {
			t.Fatal(err)
		}
		write("status/"+string(rune('a'+i))+".json", b)
	}
	write("paths.txt", []byte(strings.Join([]string{
		"/fw/sha256/" + strings.Repeat("0f", 32), "fw/acme/th-10", "/fw/acme/th-10", "/fw/sha256/../../etc", "/fw/a/b/c", "/.well-known/core",
	}, "\n")))
}

func seeds(f *testing.F, pattern string) [][]byte {
	f.Helper()
	names, _ := filepath.Glob(filepath.Join("testdata", pattern))
	if len(names) == 0 {
		f.Fatalf("no fuzz seeds match testdata/%s", pattern)
	}
	var out [][]byte
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}

func FuzzParseTargetCustom(f *testing.F) {
	for _, s := range seeds(f, "custom/*.json") {
		f.Add(s)
	}
	f.Add([]byte(`{"bastion":{"vendor":"a","model":"b","version":"1","sequence":1,"manifest":"AA==","extra":1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		tc, err := ParseTargetCustom(b)
		if err != nil {
			return
		}
		if err := tc.Class().Validate(); err != nil {
			t.Fatalf("accepted invalid class: %v", err)
		}
		if _, err := ParseVersion(tc.Version); err != nil || tc.Sequence == 0 || len(tc.Manifest) == 0 {
			t.Fatalf("accepted %+v", tc)
		}
		// Re-encoding what was accepted gives the same result.
		re, _ := json.Marshal(map[string]any{"bastion": tc})
		tc2, err := ParseTargetCustom(re)
		if err != nil {
			t.Fatalf("re-encoded custom refused: %v", err)
		}
		if d := cmp.Diff(tc, tc2); d != "" {
			t.Fatalf("round trip (-first +second):\n%s", d)
		}
	})
}

func TestSeedsParse(t *testing.T) {
	pub, err := os.ReadFile("testdata/manifest/vendor.pub")
	if err != nil {
		t.Fatal(err)
	}
	names, _ := filepath.Glob("testdata/custom/*.json")
	for _, n := range names {
		b, _ := os.ReadFile(n)
		tc, err := ParseTargetCustom(b)
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		if _, err := VerifyManifest(tc.Manifest, ed25519.PublicKey(pub)); err != nil {
			t.Errorf("%s: manifest: %v", n, err)
		}
	}
	// A manifest signed by someone else does not verify.
	other, _, _ := ed25519.GenerateKey(rand.Reader)
	b, _ := os.ReadFile("testdata/manifest/a.cose")
	if _, err := VerifyManifest(b, other); err == nil || !strings.Contains(err.Error(), "vendor signature does not verify") {
		t.Errorf("manifest with a wrong key: %v", err)
	}
	names, _ = filepath.Glob("testdata/status/*.json")
	for _, n := range names {
		b, _ := os.ReadFile(n)
		if _, err := ParseStatusReport(b); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
}

func FuzzVerifyManifest(f *testing.F) {
	pub, err := os.ReadFile("testdata/manifest/vendor.pub")
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range seeds(f, "manifest/*.cose") {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := VerifyManifest(b, ed25519.PublicKey(pub))
		if err != nil {
			return
		}
		if err := m.validate(); err != nil {
			t.Fatalf("verified manifest is invalid: %v", err)
		}
		// Flipping any byte of a verified manifest must not verify to a
		// different manifest.
		for i := range b {
			mut := bytes.Clone(b)
			mut[i] ^= 0x01
			if m2, err := VerifyManifest(mut, ed25519.PublicKey(pub)); err == nil && !cmp.Equal(m, m2) {
				t.Fatalf("byte %d flipped: verified as a different manifest", i)
			}
		}
	})
}

func FuzzParseFirmwarePath(f *testing.F) {
	for _, s := range seeds(f, "paths.txt") {
		for _, line := range strings.Split(string(s), "\n") {
			f.Add(line)
		}
	}
	f.Fuzz(func(t *testing.T, p string) {
		ref, err := ParseFirmwarePath(p)
		if err != nil {
			return
		}
		var canon string
		if ref.SHA256 != "" {
			canon = "/fw/sha256/" + ref.SHA256
		} else {
			canon = "/fw/" + ref.Class.Vendor + "/" + ref.Class.Model
			if ref.Class.Validate() != nil {
				t.Fatalf("accepted class %+v", ref.Class)
			}
		}
		if "/"+strings.TrimPrefix(p, "/") != canon {
			t.Fatalf("%q parsed as %+v (canonical %q)", p, ref, canon)
		}
		if strings.Contains(p, "..") || strings.Contains(p, "\\") || strings.Contains(p, "%") {
			t.Fatalf("accepted %q", p)
		}
	})
}

func FuzzParseStatusReport(f *testing.F) {
	for _, s := range seeds(f, "status/*.json") {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseStatusReport(b)
		if err != nil {
			return
		}
		re, err := MarshalStatusReport(st)
		if err != nil {
			t.Fatalf("accepted report does not re-encode: %v", err)
		}
		st2, err := ParseStatusReport(re)
		if err != nil {
			t.Fatalf("re-encoded report refused: %v", err)
		}
		if d := cmp.Diff(st, st2); d != "" {
			t.Fatalf("round trip (-first +second):\n%s", d)
		}
	})
}

// FuzzFirmwareRefFromOptions: the Uri-Path options read in place
// (firmwareRefFromOptions, what ServeCoAP does for every block) accept
// exactly the paths ParseFirmwarePath accepts from the joined options, with
// the same answer. Segments are separated by NUL in the input, so that a
// segment may hold a '/'.
func FuzzFirmwareRefFromOptions(f *testing.F) {
	for _, s := range seeds(f, "paths.txt") {
		for _, line := range strings.Split(string(s), "\n") {
			f.Add(strings.ReplaceAll(strings.TrimPrefix(line, "/"), "/", "\x00"))
		}
	}
	f.Add("fw\x00sha256/x\x00y")
	f.Fuzz(func(t *testing.T, in string) {
		var opts message.Options
		for _, seg := range strings.Split(in, "\x00") {
			opts = append(opts, message.Option{ID: message.URIPath, Value: []byte(seg)})
		}
		got, ok := firmwareRefFromOptions(opts)
		var want FirmwareRef
		wantOK := false
		if p, err := opts.Path(); err == nil {
			want, err = ParseFirmwarePath(p)
			wantOK = err == nil
		}
		if ok != wantOK || got != want {
			t.Fatalf("options %q: got %+v %v, ParseFirmwarePath(Path()) %+v %v", in, got, ok, want, wantOK)
		}
	})
}

// FuzzParseVersion: ParseVersion (cut in place) accepts exactly what the
// strings.Split version it replaced accepted, with the same components.
func FuzzParseVersion(f *testing.F) {
	for _, s := range []string{"1", "1.4.2", "1.2.3.4", "1.2.3.4.5", "01.2", "1..2", ".1", "1.", "4294967295.0", "4294967296", "1.-2", "", "a.b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, wantErr := splitParseVersion(s)
		got, err := ParseVersion(s)
		if (err != nil) != (wantErr != nil) || !slices.Equal(got, want) {
			t.Fatalf("ParseVersion(%q) = %v, %v; the Split parser: %v, %v", s, got, err, want, wantErr)
		}
	})
}

func splitParseVersion(s string) (Version, error) {
	if s == "" || len(s) > 64 {
		return nil, errors.New("length")
	}
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return nil, errors.New("components")
	}
	v := make(Version, len(parts))
	for i, p := range parts {
		if p == "" || (len(p) > 1 && p[0] == '0') {
			return nil, errors.New("empty or leading zero")
		}
		n, err := strconv.ParseUint(p, 10, 32)
		if err != nil {
			return nil, err
		}
		v[i] = n
	}
	return v, nil
}

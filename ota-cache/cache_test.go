package otacache

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fixture struct {
	repo    *testRepo
	devices *fakeDevices
	cache   *Cache
	dir     string
	clock   *testClock
}

type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{
		repo: newTestRepo(t),
		devices: newFakeDevices(map[string]DeviceInfo{
			"dev-a": {Class: classA, Version: "1.0.0"},
			"dev-b": {Class: classB, Version: "2.0"},
		}),
		dir:   t.TempDir(),
		clock: &testClock{t: time.Now()},
	}
	return f
}

func (f *fixture) config() Config {
	return Config{
		RepositoryURL: f.repo.url(), TrustedRoot: f.repo.rootJSON(), StateDir: f.dir,
		HTTPClient: f.repo.client(), Now: f.clock.Now,
	}
}

func (f *fixture) open(t *testing.T) *Cache {
	t.Helper()
	c, err := New(f.config(), f.devices, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	f.cache = c
	return c
}

func imageFiles(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func TestCheckVerifiesStoresAndOffers(t *testing.T) {
	f := newFixture(t)
	imgA := testImage(300_000, 1)
	_, shaA := f.repo.addImage(classA, "1.1.0", 7, imgA)
	_, shaB := f.repo.addImage(classB, "2.0", 3, testImage(5000, 2))
	f.repo.addImage(Class{Vendor: "other", Model: "x"}, "9.0", 1, testImage(100, 3)) // not enrolled
	f.repo.publish()
	c := f.open(t)
	if _, ok := c.Offer("dev-a"); ok {
		t.Fatal("offer before any check")
	}
	if err := c.Check(context.Background()); err != nil {
		t.Fatalf("Check: %v", err)
	}
	o, ok := c.Offer("dev-a")
	if !ok {
		t.Fatal("no offer for dev-a after check")
	}
	want := Offer{Device: "dev-a", Class: classA, Version: "1.1.0", Sequence: 7, Size: int64(len(imgA)), SHA256: shaA, Manifest: o.Manifest, Path: "/fw/sha256/" + shaA}
	if d := cmp.Diff(want, o); d != "" {
		t.Errorf("offer (-want +got):\n%s", d)
	}
	if _, err := VerifyManifest(o.Manifest, f.repo.vendorKey.Public()); err != nil {
		t.Errorf("offered manifest does not verify with the vendor key: %v", err)
	}
	// dev-b already runs 2.0: nothing newer to offer.
	if o, ok := c.Offer("dev-b"); ok {
		t.Errorf("dev-b runs 2.0 and was offered %+v", o)
	}
	if _, ok := c.Offer("nobody"); ok {
		t.Error("unknown device got an offer")
	}
	// Only enrolled classes are downloaded, stored under their sha256.
	if d := cmp.Diff([]string{shaA, shaB}, imageFiles(t, f.dir)); d != "" {
		t.Errorf("image files (-want +got):\n%s", d)
	}
	got, err := os.ReadFile(filepath.Join(f.dir, "images", shaA))
	if err != nil || !bytes.Equal(got, imgA) {
		t.Errorf("stored image differs from the published one (err %v)", err)
	}
	st := c.Status()
	if st.Frozen || len(st.Alarms) != 0 || st.Versions.Targets != 1 || st.Sequences["acme/th-10"] != 7 {
		t.Errorf("status after a good check: %+v", st)
	}

	// An installed report raises the device's version: no offer any more.
	if err := c.ReportStatus("dev-a", DeviceStatus{State: StateInstalled, Version: "1.1.0", SHA256: shaA}); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Offer("dev-a"); ok {
		t.Error("offer after the device reported the version installed")
	}
	if s := c.DeviceStatuses()["dev-a"]; s.State != StateInstalled || s.At.IsZero() {
		t.Errorf("status kept for the console: %+v", s)
	}
}

func TestRestartVerifiesImagesAndKeepsServingOffline(t *testing.T) {
	f := newFixture(t)
	_, sha := f.repo.addImage(classA, "1.1.0", 2, testImage(70_000, 4))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.Close()
	f.repo.Close() // vendor unreachable from now on

	c2 := f.open(t)
	if o, ok := c2.Offer("dev-a"); !ok || o.SHA256 != sha {
		t.Fatalf("after restart (verified on start) offer = %+v, %v", o, ok)
	}
	c2.Close()

	// Corrupt the stored image: verification on start removes it.
	p := filepath.Join(f.dir, "images", sha)
	b, _ := os.ReadFile(p)
	b[100] ^= 1
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	c3 := f.open(t)
	if o, ok := c3.Offer("dev-a"); ok {
		t.Errorf("corrupted image still offered after restart: %+v", o)
	}
	if files := imageFiles(t, f.dir); len(files) != 0 {
		t.Errorf("corrupted image left on disk: %v", files)
	}
}

func TestNewVersionEvictsOldAndUnenrolled(t *testing.T) {
	f := newFixture(t)
	_, sha1 := f.repo.addImage(classA, "1.1.0", 1, testImage(4000, 5))
	_, shaB := f.repo.addImage(classB, "3.0", 1, testImage(4000, 6))
	f.repo.publish()
	c := f.open(t)
	var mu sync.Mutex
	var changed []string
	cancel := c.Subscribe(func(cl Class) { mu.Lock(); changed = append(changed, cl.String()); mu.Unlock() })
	defer cancel()
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, sha2 := f.repo.addImage(classA, "1.2.0", 6, testImage(4000, 7))
	f.repo.publish()
	f.devices.remove("dev-b")
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{sha2}, imageFiles(t, f.dir)); d != "" {
		t.Errorf("after 1.2.0 and dev-b gone, images (-want +got):\n%s (old %s, B %s)", d, sha1, shaB)
	}
	if o, _ := c.Offer("dev-a"); o.Version != "1.2.0" {
		t.Errorf("offer %+v, want 1.2.0", o)
	}
	mu.Lock()
	defer mu.Unlock()
	got := strings.Join(changed, ",")
	if !containsAll(got, "acme/th-10", "globex/plug-2") || strings.Count(got, "acme/th-10") != 2 {
		t.Errorf("change notifications %q: want acme/th-10 twice and globex/plug-2", got)
	}
}

func TestCacheBound(t *testing.T) {
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 1, testImage(6000, 8))
	f.repo.addImage(classB, "3.0", 1, testImage(6000, 9))
	f.repo.publish()
	cfg := f.config()
	cfg.MaxCacheBytes, cfg.MaxImageBytes = 10_000, 8000
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "does not fit in ota.max_cache_bytes") {
		t.Fatalf("Check error = %v, want a cache bound refusal", err)
	}
	if st := c.Status(); st.Bytes > 10_000 || len(st.Images) != 1 {
		t.Errorf("cache holds %d bytes in %d images, bound 10000", st.Bytes, len(st.Images))
	}
}

// TestRefused: each attack is refused with an error naming it, and
// nothing from it is offered or stored.
func TestRefused(t *testing.T) {
	cases := []struct {
		name   string
		attack func(t *testing.T, f *fixture) // after one good check of 1.1.0
		errHas []string
		// offered is the version still offered after the attack ("" none).
		offered string
		// refused is how many targets the failed check refuses (0: the
		// metadata itself was refused).
		refused uint64
	}{
		{
			name: "tampered image",
			attack: func(t *testing.T, f *fixture) {
				p, _ := f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 20))
				f.repo.publish()
				bad := bytes.Clone(f.repo.get("/metadata/targets/" + p))
				bad[4321] ^= 0x80
				f.repo.put("/metadata/targets/"+p, bad)
			},
			errHas:  []string{"sha256", "differs from the signed", "tampered"},
			refused: 1,
		},
		{
			name: "target larger than its metadata length",
			attack: func(t *testing.T, f *fixture) {
				p, _ := f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 21))
				f.repo.publish()
				f.repo.put("/metadata/targets/"+p, append(f.repo.get("/metadata/targets/"+p), 0))
			},
			errHas:  []string{"larger than the 9000 in the signed metadata"},
			refused: 1,
		},
		{
			name: "target path with ..",
			attack: func(t *testing.T, f *fixture) {
				f.repo.addImageAt("fw/../../etc/evil.bin", classA, "1.2.0", 6, testImage(9000, 22))
				f.repo.publish()
			},
			errHas:  []string{`"fw/../../etc/evil.bin"`, "path traversal"},
			refused: 1,
			// The traversal target is dropped; 1.1.0 stays the newest valid.
			offered: "1.1.0",
		},
		{
			name: "bad signature on targets",
			attack: func(t *testing.T, f *fixture) {
				f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 23))
				_, wrong, _ := ed25519.GenerateKey(rand.Reader)
				f.repo.Keys["targets"] = wrong
				f.repo.publish()
			},
			errHas:  []string{"tuf refresh", "signature"},
			offered: "1.1.0",
		},
		{
			name: "rollback to older metadata",
			attack: func(t *testing.T, f *fixture) {
				old := f.repo.snapshotFiles()
				f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 24))
				f.repo.publish()
				if err := f.cache.Check(context.Background()); err != nil {
					t.Fatalf("check of 1.2.0: %v", err)
				}
				for p, b := range old {
					f.repo.put(p, b)
				}
			},
			errHas:  []string{"tuf refresh", "version"},
			offered: "1.2.0",
		},
		{
			name: "mix-and-match snapshot",
			attack: func(t *testing.T, f *fixture) {
				oldTargets := f.repo.get("/metadata/targets.json")
				f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 25))
				f.repo.publish()
				// New timestamp and snapshot, but the old (validly signed) targets.
				f.repo.put("/metadata/targets.json", oldTargets)
			},
			errHas:  []string{"tuf refresh", "expected targets version 2, got 1"},
			offered: "1.1.0",
		},
		{
			name: "expired timestamp (freeze)",
			attack: func(t *testing.T, f *fixture) {
				f.repo.addImage(classA, "1.2.0", 6, testImage(9000, 26))
				f.repo.TimestampExpires = time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
				f.repo.publish()
			},
			errHas: []string{"tuf refresh", "expired"},
		},
		{
			name: "sequence number rollback",
			attack: func(t *testing.T, f *fixture) {
				// Validly signed new metadata whose only class-A image has a
				// lower sequence than the one already seen.
				delete(f.repo.Targets.Signed.Targets, "fw/acme/th-10/1.1.0.bin")
				f.repo.addImage(classA, "1.0.5", 1, testImage(9000, 27))
				f.repo.publish()
			},
			errHas:  []string{"sequence 1, below 5 already seen", "rollback refused"},
			refused: 1,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			_, sha1 := f.repo.addImage(classA, "1.1.0", 5, testImage(8000, 10))
			f.repo.publish()
			c := f.open(t)
			if err := c.Check(context.Background()); err != nil {
				t.Fatalf("good check: %v", err)
			}
			before := imageFiles(t, f.dir)
			tc.attack(t, f)
			if tc.offered == "1.2.0" {
				before = imageFiles(t, f.dir)
			}
			k := c.Status().Counters
			err := c.Check(context.Background())
			if err == nil || !containsAll(err.Error(), tc.errHas...) {
				t.Fatalf("Check error = %v\nwant it to contain %q", err, tc.errHas)
			}
			t.Logf("refused: %v", err)
			// The metrics (bastion_firmware_refusals_total) count it.
			k2 := c.Status().Counters
			if got := k2.CheckFailures - k.CheckFailures; got != 1 {
				t.Errorf("CheckFailures went up by %d, want 1", got)
			}
			if got := k2.TargetsRefused - k.TargetsRefused; got != tc.refused {
				t.Errorf("TargetsRefused went up by %d, want %d", got, tc.refused)
			}
			o, ok := c.Offer("dev-a")
			if tc.offered == "" && ok {
				t.Errorf("offered %s after the attack, want nothing", o.Version)
			}
			if tc.offered != "" && o.Version != tc.offered {
				t.Errorf("offered %q after the attack, want %q", o.Version, tc.offered)
			}
			for _, name := range imageFiles(t, f.dir) {
				if !strings.Contains(strings.Join(before, ","), name) {
					t.Errorf("image %s from the attack was stored", name)
				}
			}
			if strings.HasPrefix(tc.name, "expired") {
				st := c.Status()
				if !st.Frozen || len(st.Alarms) == 0 || !strings.Contains(strings.Join(st.Alarms, " "), "freeze") {
					t.Errorf("freeze not raised as an alarm: %+v", st)
				}
				if _, err := c.imageForServe("dev-a", FirmwareRef{SHA256: sha1}); err == nil {
					t.Error("verified image still served while metadata is expired")
				}
			}
		})
	}
}

func TestExpiryWithoutNewMetadataFreezes(t *testing.T) {
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 1, testImage(1000, 30))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.Offer("dev-a"); !ok {
		t.Fatal("no offer")
	}
	// The vendor goes silent; the clock passes the timestamp's expiry.
	f.clock.Add(25 * time.Hour)
	if o, ok := c.Offer("dev-a"); ok {
		t.Errorf("offer %+v after the metadata expired", o)
	}
	if st := c.Status(); !st.Frozen || len(st.Alarms) == 0 {
		t.Errorf("status %+v: want Frozen with an alarm", st)
	}
}

func TestRunChecksAtStart(t *testing.T) {
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 1, testImage(1000, 31))
	f.repo.publish()
	c := f.open(t)
	ready := make(chan struct{}, 1)
	c.Subscribe(func(Class) {
		select {
		case ready <- struct{}{}:
		default:
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- c.Run(ctx) }()
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not check at start")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := c.Status(); st.Counters.Checks != 1 {
		t.Errorf("checks = %d, want 1 (the next waits 6h±36m)", st.Counters.Checks)
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{RepositoryURL: "https://v.example/m", TrustedRoot: []byte("{}"), StateDir: "/x"}
	good.setDefaults()
	if err := good.Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	cases := map[string]struct {
		mut  func(*Config)
		want string
	}{
		"http":      {func(c *Config) { c.RepositoryURL = "http://v.example/m" }, "ota.repository_url \"http://v.example/m\": want an https:// URL"},
		"no root":   {func(c *Config) { c.TrustedRoot = nil }, "ota.trusted_root: the vendor's root.json is required"},
		"no state":  {func(c *Config) { c.StateDir = "" }, "ota.state_dir: required"},
		"interval":  {func(c *Config) { c.CheckInterval = time.Second }, "ota.check_interval 1s: want at least 1m"},
		"stall":     {func(c *Config) { c.StallTimeout = -time.Second }, "ota.stall_timeout -1s: want a positive duration"},
		"jitter":    {func(c *Config) { c.CheckJitter = 7 * time.Hour }, "ota.check_jitter 7h0m0s: want 0 <= jitter < check_interval"},
		"bounds":    {func(c *Config) { c.MaxCacheBytes = 10 }, "ota.max_cache_bytes 10, ota.max_image_bytes 268435456"},
		"vendorkey": {func(c *Config) { c.VendorKeys = map[string]crypto.PublicKey{"acme": "nope"} }, "ota.vendor_keys[acme]: vendor key of type string"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			c := good
			tc.mut(&c)
			err := c.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate() = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestJitter(t *testing.T) {
	lo := jittered(6*time.Hour, 36*time.Minute, func(int64) int64 { return 0 })
	hi := jittered(6*time.Hour, 36*time.Minute, func(n int64) int64 { return n - 1 })
	if lo != 6*time.Hour-36*time.Minute || hi != 6*time.Hour+36*time.Minute {
		t.Errorf("jitter range [%v, %v], want [5h24m, 6h36m]", lo, hi)
	}
	seen := map[time.Duration]bool{}
	for range 50 {
		seen[jittered(time.Hour, time.Minute, mrand.Int64N)] = true
	}
	if len(seen) < 2 {
		t.Error("jitter with math/rand gave the same wait every time")
	}
}

func TestSequenceFloorSurvivesRestart(t *testing.T) {
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 9, testImage(2000, 50))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Restart, then the vendor (or whoever holds the targets key) publishes
	// validly signed metadata whose class-A image has a lower sequence.
	c2 := f.open(t)
	delete(f.repo.Targets.Signed.Targets, "fw/acme/th-10/1.1.0.bin")
	f.repo.addImage(classA, "1.3.0", 4, testImage(2000, 51))
	f.repo.publish()
	err := c2.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "sequence 4, below 9 already seen") {
		t.Fatalf("Check after restart = %v, want the sequence floor of 9 to hold", err)
	}
	if o, ok := c2.Offer("dev-a"); ok {
		t.Errorf("offered %+v below the persisted floor", o)
	}
}

// TestOnlyConfiguredRootIsTrusted: a repository signed with other keys
// than the configured root.json (an impostor, or a MITM with a valid TLS
// certificate) is refused; nothing is trusted on first download.
func TestOnlyConfiguredRootIsTrusted(t *testing.T) {
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 1, testImage(1000, 60))
	f.repo.publish()
	other := newTestRepo(t)
	cfg := f.config()
	cfg.TrustedRoot = other.rootJSON()
	c, err := New(cfg, f.devices, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "tuf refresh") {
		t.Fatalf("Check against a repository the configured root does not sign = %v, want a refusal", err)
	}
	t.Logf("refused: %v", err)
	if _, ok := c.Offer("dev-a"); ok || len(imageFiles(t, f.dir)) != 0 {
		t.Error("something from the impostor repository was offered or stored")
	}
	if _, err := New(Config{RepositoryURL: f.repo.url(), StateDir: t.TempDir()}, f.devices, nil); err == nil || !strings.Contains(err.Error(), "never trusts a root on first download") {
		t.Errorf("New without a trusted root = %v", err)
	}
}

// TestClassesUnreadableKeepsTheCache: when the enrolled classes cannot be
// read, a check keeps (and updates) every class it holds instead of
// evicting them all as if none were enrolled, and says why.
func TestClassesUnreadableKeepsTheCache(t *testing.T) {
	f := newFixture(t)
	_, shaA := f.repo.addImage(classA, "1.1.0", 1, testImage(3000, 90))
	_, shaB := f.repo.addImage(classB, "2.1", 1, testImage(3000, 91))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.devices.failClasses(errors.New("device store: input/output error"))
	_, shaA2 := f.repo.addImage(classA, "1.2.0", 2, testImage(3000, 92))
	f.repo.publish()
	err := c.Check(context.Background())
	if err == nil || !containsAll(err.Error(), "enrolled device classes unreadable", "input/output error") {
		t.Fatalf("check with the classes unreadable: %v", err)
	}
	if o, ok := c.Offer("dev-a"); !ok || o.SHA256 != shaA2 {
		t.Errorf("dev-a: %+v, %v; want 1.2.0 (%s)", o, ok, shaA2)
	}
	if o, ok := c.Offer("dev-b"); !ok || o.SHA256 != shaB {
		t.Errorf("dev-b: %+v, %v; want 2.1 (%s)", o, ok, shaB)
	}
	want := []string{shaA2, shaB}
	sort.Strings(want)
	if d := cmp.Diff(want, imageFiles(t, f.dir)); d != "" {
		t.Errorf("image files (-want +got):\n%s (1.1.0 was %s)", d, shaA)
	}
	if a := strings.Join(c.Status().Alarms, " "); !strings.Contains(a, "enrolled device classes unreadable") {
		t.Errorf("alarms %q: want the unreadable classes", a)
	}
	f.devices.failClasses(nil)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if a := c.Status().Alarms; len(a) != 0 {
		t.Errorf("alarms after the classes were read again: %q", a)
	}
}

package otacache

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/config"
	"github.com/theupdateframework/go-tuf/v2/metadata/updater"
)

// DeviceInfo is what the gateway knows about an enrolled device.
type DeviceInfo struct {
	Class Class
	// Version is the firmware version the device last reported ("" if
	// unknown: then any image of its class is newer).
	Version string
}

// Devices is implemented by the gateway: it maps authenticated device
// identities to their class and reported version, and lists the classes
// that are enrolled (only those are downloaded and kept).
type Devices interface {
	Device(id string) (DeviceInfo, bool)
	Classes() []Class
}

// Cache is the verified firmware cache. It is safe for concurrent use.
type Cache struct {
	cfg     Config
	devices Devices
	log     *slog.Logger

	checkMu sync.Mutex // one check at a time; Check and Run share it

	mu       sync.RWMutex
	st       persisted
	images   map[string]*image // by sha256 hex, verified and open
	current  map[Class]*image  // what each class is offered
	retired  []*image          // evicted, closed after EvictGrace
	lastErr  string
	alarms   map[string]string // key → message, for Status
	statuses map[string]DeviceStatus
	sw       *statusWriter   // nil without a Config.StatusStore
	unsaved  map[string]bool // devices whose last status write failed
	subs     map[int]func(Class)
	nextSub  int
	counters Counters
	closed   bool
}

// persisted is state.json.
type persisted struct {
	// Sequences is the highest sequence number ever seen in verified
	// targets metadata per class ("vendor/model"). It only grows.
	Sequences map[string]uint64 `json:"sequences"`
	// Images are the images on disk with the target they came from.
	Images map[string]storedImage `json:"images"`
	// Current maps a class to the sha256 it is offered.
	Current map[string]string `json:"current"`
	// ValidUntil is the earliest expiry of the trusted timestamp, snapshot
	// and targets metadata; past it nothing is offered (freeze defence).
	ValidUntil time.Time `json:"valid_until"`
	// Versions of the trusted metadata, for the console.
	Versions MetadataVersions `json:"versions"`
}

type storedImage struct {
	Target string       `json:"target"`
	Length int64        `json:"length"`
	Custom TargetCustom `json:"custom"`
}

// MetadataVersions are the versions of the trusted top-level TUF metadata.
type MetadataVersions struct {
	Root, Timestamp, Snapshot, Targets int64
}

type image struct {
	sha    string // hex
	size   int64
	target string
	tc     TargetCustom
	ver    Version
	f      *os.File // opened and verified; served from this fd only
	m      *mapping // f mapped for CoAP blocks; nil where it could not be
	tag    [8]byte  // the CoAP ETag: the sha256's first 8 bytes
}

// Counters are monotonically increasing event counts for metrics.
type Counters struct {
	Checks, CheckFailures, ImagesDownloaded, TargetsRefused, Served, ServeRefused uint64
	// ServeCut counts HTTPS transfers the cache ended before their last
	// byte: the device read nothing for HTTPLimits.WriteStall, or lost its
	// identity (revoked, removed) during the transfer.
	ServeCut uint64
}

// New opens the cache in cfg.StateDir and verifies every image on disk
// before it can be served; an image that fails is deleted. It does no
// network I/O: call Run (or Check) for that.
func New(cfg Config, devices Devices, log *slog.Logger) (*Cache, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("ota-cache config: %w", err)
	}
	if _, err := (&metadata.Metadata[metadata.RootType]{}).FromBytes(cfg.TrustedRoot); err != nil {
		return nil, fmt.Errorf("ota-cache config: trusted root is not TUF root metadata: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cache{
		cfg: cfg, devices: devices, log: log.With("component", "ota-cache"),
		images: map[string]*image{}, current: map[Class]*image{},
		alarms: map[string]string{}, statuses: map[string]DeviceStatus{}, unsaved: map[string]bool{}, subs: map[int]func(Class){},
	}
	for _, d := range []string{cfg.StateDir, c.metaDir(), c.imageDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("ota-cache: create %s: %w", d, err)
		}
	}
	if err := c.load(); err != nil {
		c.Close()
		return nil, err
	}
	if cfg.StatusStore != nil {
		c.sw = newStatusWriter(cfg.StatusStore)
		if err := c.loadStatuses(); err != nil {
			c.Close()
			return nil, fmt.Errorf("ota-cache: load device firmware statuses: %w", err)
		}
	}
	return c, nil
}

func (c *Cache) metaDir() string  { return filepath.Join(c.cfg.StateDir, "metadata") }
func (c *Cache) imageDir() string { return filepath.Join(c.cfg.StateDir, "images") }
func (c *Cache) statePath() string {
	return filepath.Join(c.cfg.StateDir, "state.json")
}

func (c *Cache) load() error {
	c.st = persisted{Sequences: map[string]uint64{}, Images: map[string]storedImage{}, Current: map[string]string{}}
	b, err := os.ReadFile(c.statePath())
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("ota-cache: read %s: %w", c.statePath(), err)
	default:
		if err := json.Unmarshal(b, &c.st); err != nil {
			return fmt.Errorf("ota-cache: %s is corrupt (delete it to start over; sequence floors are then lost): %w", c.statePath(), err)
		}
		if c.st.Sequences == nil {
			c.st.Sequences = map[string]uint64{}
		}
		if c.st.Images == nil {
			c.st.Images = map[string]storedImage{}
		}
		if c.st.Current == nil {
			c.st.Current = map[string]string{}
		}
	}
	// Verify on start: every image is hashed again before it is served.
	for sha, si := range c.st.Images {
		img, err := c.openVerified(sha, si)
		if err != nil {
			c.log.Warn("cached image failed verification on start; deleted", "sha256", sha, "err", err)
			_ = os.Remove(filepath.Join(c.imageDir(), sha))
			delete(c.st.Images, sha)
			continue
		}
		c.images[sha] = img
	}
	for cls, sha := range c.st.Current {
		img, ok := c.images[sha]
		if !ok {
			delete(c.st.Current, cls)
			continue
		}
		c.current[img.tc.Class()] = img
	}
	// Files no state names are leftovers (crash mid-download): remove.
	entries, _ := os.ReadDir(c.imageDir())
	for _, e := range entries {
		if _, ok := c.images[e.Name()]; !ok {
			_ = os.Remove(filepath.Join(c.imageDir(), e.Name()))
		}
	}
	return nil
}

func (c *Cache) openVerified(sha string, si storedImage) (*image, error) {
	want, err := hex.DecodeString(sha)
	if err != nil || len(want) != 32 {
		return nil, fmt.Errorf("image name %q is not a sha256", sha)
	}
	ver, err := ParseVersion(si.Custom.Version)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(c.imageDir(), sha))
	if err != nil {
		return nil, err
	}
	if err := verifyFile(f, si.Length, want); err != nil {
		f.Close()
		return nil, err
	}
	img := &image{sha: sha, size: si.Length, target: si.Target, tc: si.Custom, ver: ver, f: f}
	copy(img.tag[:], want)
	if img.m, err = mapFile(f, si.Length); err != nil && si.Length > 0 {
		c.log.Info("firmware image served from its file, not mapped", "sha256", sha, "err", err)
	}
	return img, nil
}

// coapBody is what a CoAP transfer reads: the mapping when there is one
// (no syscall per block), the file otherwise.
func (img *image) coapBody() io.ReadSeeker {
	if img.m != nil {
		return &imageBody{*io.NewSectionReader(img.m, 0, img.size)}
	}
	return &imageBody{*io.NewSectionReader(img.f, 0, img.size)}
}

// imageBody is a verified image as a response body. It is a StableBody:
// the image is read from its verified descriptor or its read-only mapping
// of it, never by path, and the cache never rewrites its files, so the
// bytes at an offset never change (ServeDTLS's response cache keeps where
// a block is instead of a copy). Once the image is dropped, reading fails.
type imageBody struct{ io.SectionReader }

// StableBody marks imageBody as a StableBody.
func (*imageBody) StableBody() {}

// close releases the mapping (after the copies in progress) and the file.
func (img *image) close() {
	if img.m != nil {
		_ = img.m.unmap()
	}
	img.f.Close()
}

// Close releases every open image. Serving after Close refuses.
func (c *Cache) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for _, img := range c.images {
		img.close()
	}
	for _, img := range c.retired {
		img.close()
	}
	c.images, c.current, c.retired = map[string]*image{}, map[Class]*image{}, nil
	return nil
}

// Run checks at once, then every CheckInterval ± CheckJitter until ctx
// ends. Failed checks are logged and shown in Status; they do not stop Run.
func (c *Cache) Run(ctx context.Context) error {
	for {
		if err := c.Check(ctx); err != nil && ctx.Err() == nil {
			c.log.Warn("firmware check failed", "err", err)
		}
		t := time.NewTimer(jittered(c.cfg.CheckInterval, c.cfg.CheckJitter, rand.Int64N))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// jittered returns d moved by a uniform amount in [-j, +j]; randN(n)
// returns a uniform number in [0, n).
func jittered(d, j time.Duration, randN func(int64) int64) time.Duration {
	if j <= 0 {
		return d
	}
	return d + time.Duration(randN(int64(2*j)+1)) - j
}

// ctxTransport gives go-tuf's fetcher (which takes no context) the
// check's context, so that cancelling a check stops its downloads.
type ctxTransport struct {
	ctx  context.Context
	base http.RoundTripper
}

func (t ctxTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	return t.base.RoundTrip(r.WithContext(t.ctx))
}

func (c *Cache) httpClient(ctx context.Context) *http.Client {
	hc := *c.cfg.HTTPClient
	base := hc.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	hc.Transport = ctxTransport{ctx: ctx, base: base}
	return &hc
}

// trustedRoot is the newest root the client has verified: the one in the
// metadata directory if it descends from (is newer than) the configured
// root, else the configured one.
func (c *Cache) trustedRoot() []byte {
	cfgRoot, err := (&metadata.Metadata[metadata.RootType]{}).FromBytes(c.cfg.TrustedRoot)
	if err != nil {
		return c.cfg.TrustedRoot
	}
	b, err := os.ReadFile(filepath.Join(c.metaDir(), "root.json"))
	if err != nil {
		return c.cfg.TrustedRoot
	}
	local, err := (&metadata.Metadata[metadata.RootType]{}).FromBytes(b)
	if err != nil || local.Signed.Version <= cfgRoot.Signed.Version {
		return c.cfg.TrustedRoot
	}
	return b
}

// candidate is a verified-metadata firmware target.
type candidate struct {
	path   string
	tf     *metadata.TargetFiles
	tc     TargetCustom
	ver    Version
	sha256 []byte
}

// Check runs one TUF refresh with a fresh Updater over the persistent
// metadata directory, downloads and verifies what enrolled classes need,
// and updates offers. Errors name what was refused and why.
func (c *Cache) Check(ctx context.Context) error {
	c.checkMu.Lock()
	defer c.checkMu.Unlock()
	c.count(func(k *Counters) { k.Checks++ })
	err := c.check(ctx)
	c.mu.Lock()
	if err != nil {
		c.counters.CheckFailures++
		c.lastErr = err.Error()
	} else {
		c.lastErr = ""
	}
	c.mu.Unlock()
	return err
}

func (c *Cache) check(ctx context.Context) error {
	now := c.cfg.Now()
	ucfg, err := config.New(c.cfg.RepositoryURL, c.trustedRoot())
	if err != nil {
		return fmt.Errorf("tuf config for %s: %w", c.cfg.RepositoryURL, err)
	}
	ucfg.LocalMetadataDir = c.metaDir()
	ucfg.LocalTargetsDir = filepath.Join(c.cfg.StateDir, "tuf-targets-unused")
	ucfg.RemoteTargetsURL = c.cfg.TargetsURL
	if err := ucfg.SetDefaultFetcherHTTPClient(c.httpClient(ctx)); err != nil {
		return fmt.Errorf("tuf fetcher: %w", err)
	}
	up, err := updater.New(ucfg)
	if err != nil {
		return fmt.Errorf("tuf updater with the trusted root: %w", err)
	}
	up.UnsafeSetRefTime(now.UTC())
	if err := up.Refresh(); err != nil {
		if errors.Is(err, &metadata.ErrExpiredMetadata{}) {
			c.setAlarm("freeze", "vendor TUF metadata has expired (possible freeze attack): no new offers until the repository serves fresh metadata: "+err.Error())
			c.mu.Lock()
			if c.st.ValidUntil.After(now) {
				c.st.ValidUntil = now
			}
			c.mu.Unlock()
			_ = c.save()
			c.notifyAll()
		}
		return fmt.Errorf("tuf refresh from %s: %w", c.cfg.RepositoryURL, err)
	}
	trusted := up.GetTrustedMetadataSet()
	validUntil := trusted.Timestamp.Signed.Expires
	for _, e := range []time.Time{trusted.Snapshot.Signed.Expires, trusted.Targets[metadata.TARGETS].Signed.Expires} {
		if e.Before(validUntil) {
			validUntil = e
		}
	}
	versions := MetadataVersions{
		Root: trusted.Root.Signed.Version, Timestamp: trusted.Timestamp.Signed.Version,
		Snapshot: trusted.Snapshot.Signed.Version, Targets: trusted.Targets[metadata.TARGETS].Signed.Version,
	}
	c.clearAlarm("freeze")

	best, refusals := c.selectTargets(up.GetTopLevelTargets())

	enrolled := map[Class]bool{}
	for _, cl := range c.devices.Classes() {
		enrolled[cl] = true
	}
	c.mu.RLock()
	floors := maps.Clone(c.st.Sequences)
	c.mu.RUnlock()

	// Anti-rollback on the sequence number: a class is offered nothing
	// rather than an image older than one already seen.
	want := map[Class]candidate{}
	for cl, cand := range best {
		if floor := floors[cl.String()]; cand.tc.Sequence < floor {
			refusals = append(refusals, fmt.Errorf("class %s: newest target %s has sequence %d, below %d already seen: rollback refused, nothing offered", cl, cand.path, cand.tc.Sequence, floor))
			continue
		}
		floors[cl.String()] = cand.tc.Sequence
		if enrolled[cl] {
			want[cl] = cand
		}
	}

	// Bound the cache: the newest image of every enrolled class must fit.
	var total int64
	for _, cl := range sortedClasses(want) {
		if total+want[cl].tf.Length > c.cfg.MaxCacheBytes {
			refusals = append(refusals, fmt.Errorf("class %s: image %s of %d bytes does not fit in ota.max_cache_bytes %d with the other enrolled classes", cl, want[cl].path, want[cl].tf.Length, c.cfg.MaxCacheBytes))
			delete(want, cl)
			continue
		}
		total += want[cl].tf.Length
	}

	// Download what is missing.
	fresh := map[string]*image{}
	for _, cl := range sortedClasses(want) {
		cand := want[cl]
		sha := hex.EncodeToString(cand.sha256)
		c.mu.RLock()
		_, have := c.images[sha]
		c.mu.RUnlock()
		if have {
			continue
		}
		img, err := c.download(ctx, up, cand)
		if err != nil {
			refusals = append(refusals, fmt.Errorf("class %s: target %s refused: %w", cl, cand.path, err))
			delete(want, cl)
			continue
		}
		fresh[sha] = img
		c.count(func(k *Counters) { k.ImagesDownloaded++ })
	}

	// Swap in the new state.
	var changed []Class
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		for _, img := range fresh {
			img.close()
		}
		return errors.New("ota-cache closed during check")
	}
	for sha, img := range fresh {
		c.images[sha] = img
		c.st.Images[sha] = storedImage{Target: img.target, Length: img.size, Custom: img.tc}
	}
	newCurrent := map[Class]*image{}
	for cl, cand := range want {
		newCurrent[cl] = c.images[hex.EncodeToString(cand.sha256)]
	}
	for cl := range enrolled {
		if c.current[cl] != newCurrent[cl] {
			changed = append(changed, cl)
		}
	}
	for cl := range c.current {
		if !enrolled[cl] && newCurrent[cl] == nil {
			changed = append(changed, cl)
		}
	}
	c.current = newCurrent
	c.st.Current = map[string]string{}
	for cl, img := range newCurrent {
		c.st.Current[cl.String()] = img.sha
	}
	// Evict what no enrolled class needs.
	for sha, img := range c.images {
		if newCurrent[img.tc.Class()] == img {
			continue
		}
		delete(c.images, sha)
		delete(c.st.Images, sha)
		_ = os.Remove(filepath.Join(c.imageDir(), sha))
		c.retire(img)
	}
	c.st.Sequences = floors
	c.st.ValidUntil = validUntil
	c.st.Versions = versions
	c.counters.TargetsRefused += uint64(len(refusals))
	c.mu.Unlock()
	if err := c.save(); err != nil {
		refusals = append(refusals, err)
	}
	for _, r := range refusals {
		c.log.Warn("firmware target refused", "err", r)
	}
	if len(refusals) > 0 {
		c.setAlarm("refused", errors.Join(refusals...).Error())
	} else {
		c.clearAlarm("refused")
	}
	c.notify(changed)
	return errors.Join(refusals...)
}

// selectTargets parses every top-level target and keeps the highest
// sequence per class. Targets with no Bastion metadata are skipped.
func (c *Cache) selectTargets(targets map[string]*metadata.TargetFiles) (map[Class]candidate, []error) {
	best := map[Class]candidate{}
	var refusals []error
	paths := slices.Sorted(maps.Keys(targets))
	for _, p := range paths {
		tf := targets[p]
		if tf.Custom == nil {
			continue
		}
		cand, err := c.checkTarget(p, tf)
		if errors.Is(err, ErrNotFirmware) {
			continue
		}
		if err != nil {
			refusals = append(refusals, fmt.Errorf("target %q refused: %w", p, err))
			continue
		}
		cl := cand.tc.Class()
		prev, ok := best[cl]
		switch {
		case !ok || cand.tc.Sequence > prev.tc.Sequence:
			best[cl] = cand
		case cand.tc.Sequence == prev.tc.Sequence:
			refusals = append(refusals, fmt.Errorf("class %s: targets %q and %q both claim sequence %d: ambiguous, class refused", cl, prev.path, p, cand.tc.Sequence))
			best[cl] = candidate{} // poison: nothing for this class
		}
	}
	for cl, cand := range best {
		if cand.tf == nil {
			delete(best, cl)
		}
	}
	return best, refusals
}

func (c *Cache) checkTarget(p string, tf *metadata.TargetFiles) (candidate, error) {
	tc, err := ParseTargetCustom(*tf.Custom)
	if err != nil {
		return candidate{}, err
	}
	if err := ValidTargetPath(p); err != nil {
		return candidate{}, err
	}
	if tf.Length <= 0 || tf.Length > c.cfg.MaxImageBytes {
		return candidate{}, fmt.Errorf("length %d: want 1..%d (ota.max_image_bytes)", tf.Length, c.cfg.MaxImageBytes)
	}
	sha, ok := tf.Hashes["sha256"]
	if !ok || len(sha) != 32 {
		return candidate{}, errors.New("no sha256 hash in its metadata (images are stored and served by sha256)")
	}
	for alg := range tf.Hashes {
		if alg != "sha256" && alg != "sha512" {
			return candidate{}, fmt.Errorf("hash algorithm %q is not supported (sha256, sha512)", alg)
		}
	}
	m, _, err := decodeManifest(tc.Manifest)
	if err != nil {
		return candidate{}, err
	}
	if err := m.matches(tc, tf.Length, sha); err != nil {
		return candidate{}, err
	}
	if key, ok := c.cfg.VendorKeys[tc.Vendor]; ok {
		if _, err := VerifyManifest(tc.Manifest, key); err != nil {
			return candidate{}, err
		}
	}
	ver, _ := ParseVersion(tc.Version) // validated by ParseTargetCustom
	return candidate{path: p, tf: tf, tc: tc, ver: ver, sha256: sha}, nil
}

func sortedClasses[V any](m map[Class]V) []Class {
	cls := slices.Collect(maps.Keys(m))
	sort.Slice(cls, func(i, j int) bool { return cls[i].String() < cls[j].String() })
	return cls
}

// retire keeps an evicted image's fd open for EvictGrace so that transfers
// in progress can finish; the file itself is already unlinked. Caller holds mu.
func (c *Cache) retire(img *image) {
	c.retired = append(c.retired, img)
	time.AfterFunc(c.cfg.EvictGrace, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if i := slices.Index(c.retired, img); i >= 0 {
			c.retired = slices.Delete(c.retired, i, i+1)
			img.close()
		}
	})
}

func (c *Cache) save() error {
	c.mu.RLock()
	b, err := json.MarshalIndent(c.st, "", "  ")
	c.mu.RUnlock()
	if err != nil {
		return fmt.Errorf("ota-cache: encode state: %w", err)
	}
	return writeFileAtomic(c.statePath(), b)
}

func (c *Cache) count(f func(*Counters)) {
	c.mu.Lock()
	f(&c.counters)
	c.mu.Unlock()
}

func (c *Cache) setAlarm(key, msg string) {
	c.mu.Lock()
	c.alarms[key] = msg
	c.mu.Unlock()
}

func (c *Cache) clearAlarm(key string) {
	c.mu.Lock()
	delete(c.alarms, key)
	c.mu.Unlock()
}

// Status is the cache's state for the console and metrics.
type Status struct {
	LastError string
	// Frozen is true when the trusted metadata has expired (or was never
	// fetched): nothing is offered or served. It is an alarm.
	Frozen     bool
	ValidUntil time.Time
	Versions   MetadataVersions
	// Alarms holds human-readable problems (freeze, refused targets).
	Alarms   []string
	Images   []ImageInfo
	Bytes    int64
	Counters Counters
	// Sequences is the anti-rollback floor per class.
	Sequences map[string]uint64
}

// ImageInfo describes one cached, verified image.
type ImageInfo struct {
	Class    Class
	Version  string
	Sequence uint64
	Size     int64
	SHA256   string
	Target   string
}

// Status reports the cache state.
func (c *Cache) Status() Status {
	c.mu.RLock()
	defer c.mu.RUnlock()
	s := Status{
		LastError: c.lastErr, ValidUntil: c.st.ValidUntil, Versions: c.st.Versions,
		Counters: c.counters, Sequences: maps.Clone(c.st.Sequences),
	}
	s.Frozen = !c.st.ValidUntil.After(c.cfg.Now())
	if s.Frozen {
		if _, ok := c.alarms["freeze"]; !ok {
			s.Alarms = append(s.Alarms, fmt.Sprintf("no valid vendor metadata (expired or never fetched; valid until %v): nothing is offered", c.st.ValidUntil))
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.alarms)) {
		s.Alarms = append(s.Alarms, c.alarms[k])
	}
	for _, img := range c.images {
		s.Bytes += img.size
		s.Images = append(s.Images, ImageInfo{Class: img.tc.Class(), Version: img.tc.Version, Sequence: img.tc.Sequence, Size: img.size, SHA256: img.sha, Target: img.target})
	}
	sort.Slice(s.Images, func(i, j int) bool { return s.Images[i].SHA256 < s.Images[j].SHA256 })
	return s
}

// Subscribe registers fn to be called (from the checking goroutine; it
// must not block) with each class whose offer changed. Transports use it
// to notify CoAP observers and publish on MQTT. cancel unregisters.
func (c *Cache) Subscribe(fn func(Class)) (cancel func()) {
	c.mu.Lock()
	id := c.nextSub
	c.nextSub++
	c.subs[id] = fn
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		delete(c.subs, id)
		c.mu.Unlock()
	}
}

func (c *Cache) notify(classes []Class) {
	if len(classes) == 0 {
		return
	}
	c.mu.RLock()
	subs := slices.Collect(maps.Values(c.subs))
	c.mu.RUnlock()
	for _, cl := range classes {
		for _, fn := range subs {
			fn(cl)
		}
	}
}

func (c *Cache) notifyAll() {
	c.mu.RLock()
	cls := slices.Collect(maps.Keys(c.current))
	c.mu.RUnlock()
	c.notify(cls)
}

package otacache

import (
	"bytes"
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
// that are enrolled (only those are downloaded and kept). An error from
// Classes means the list could not be read, not that it is empty.
type Devices interface {
	Device(id string) (DeviceInfo, bool)
	Classes() ([]Class, error)
}

// Cache is the verified firmware cache. It is safe for concurrent use.
type Cache struct {
	cfg     Config
	devices Devices
	log     *slog.Logger

	checkMu sync.Mutex // one check at a time; Check and Run share it

	mu       sync.RWMutex
	st       persisted
	blobs    map[string]*blob // by sha256 hex, verified and open; each is some class's current image
	current  map[Class]*image // what each class is offered
	retired  []*blob          // evicted, closed after EvictGrace
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
	// Images are the image files on disk, by sha256: their length (and
	// the target of one class that offers them, which is all a state
	// written before Targets existed has).
	Images map[string]storedImage `json:"images"`
	// Current maps a class to the sha256 it is offered.
	Current map[string]string `json:"current"`
	// Targets is each class's target for the image it is offered: two
	// classes whose targets are the same bytes share one file, not their
	// version, sequence or manifest.
	Targets map[string]storedImage `json:"targets"`
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

// blob is a verified image file, opened and mapped once however many
// classes' targets are these bytes.
type blob struct {
	sha  string // hex
	size int64
	f    *os.File // opened and verified; served from this fd only
	m    *mapping // f mapped for CoAP blocks; nil where it could not be
	tag  [8]byte  // the CoAP ETag: the sha256's first 8 bytes
}

// image is what one class is offered: a blob and that class's own target
// metadata.
type image struct {
	*blob
	target string
	tc     TargetCustom
	ver    Version
}

// newImage is b offered to the class of si's target.
func newImage(b *blob, si storedImage) (*image, error) {
	ver, err := ParseVersion(si.Custom.Version)
	if err != nil {
		return nil, err
	}
	if si.Length != b.size {
		return nil, fmt.Errorf("target %s of %d bytes names image %s of %d", si.Target, si.Length, b.sha, b.size)
	}
	return &image{blob: b, target: si.Target, tc: si.Custom, ver: ver}, nil
}

// sameTarget reports whether img is what cand says, so that a check that
// finds nothing new keeps img (and announces no change).
func (img *image) sameTarget(cand candidate) bool {
	return img.sha == hex.EncodeToString(cand.sha256) && img.target == cand.path && img.tc.Vendor == cand.tc.Vendor &&
		img.tc.Model == cand.tc.Model && img.tc.Version == cand.tc.Version && img.tc.Sequence == cand.tc.Sequence &&
		bytes.Equal(img.tc.Manifest, cand.tc.Manifest)
}

// Counters are monotonically increasing event counts for metrics.
type Counters struct {
	Checks, CheckFailures, ImagesDownloaded, TargetsRefused, Served, ServeRefused uint64
	// ServeCut counts HTTPS transfers the cache ended before their last
	// byte: the device read nothing for HTTPLimits.WriteStall, or lost its
	// identity (revoked, removed) during the transfer.
	ServeCut uint64
	// StatusRefused counts device status reports refused as bad input
	// (malformed, invalid, from a device not enrolled), on CoAP
	// (ServeCoAPStatus) and on the transports that report theirs with
	// StatusReportRefused. A report taken but not stored is not one.
	StatusRefused uint64
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
		blobs: map[string]*blob{}, current: map[Class]*image{},
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
	c.st = persisted{Sequences: map[string]uint64{}, Images: map[string]storedImage{}, Current: map[string]string{}, Targets: map[string]storedImage{}}
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
		if c.st.Targets == nil {
			c.st.Targets = map[string]storedImage{}
		}
	}
	// Verify on start: every image is hashed again before it is served.
	for sha, si := range c.st.Images {
		b, err := c.openVerified(sha, si.Length)
		if err != nil {
			c.log.Warn("cached image failed verification on start; deleted", "sha256", sha, "err", err)
			_ = os.Remove(filepath.Join(c.imageDir(), sha))
			delete(c.st.Images, sha)
			continue
		}
		c.blobs[sha] = b
	}
	for cls, sha := range c.st.Current {
		si, ok := c.st.Targets[cls]
		if !ok {
			si = c.st.Images[sha] // a state from before Targets: one class per image
		}
		var img *image
		err := fmt.Errorf("image %s is not held", sha)
		if b := c.blobs[sha]; b != nil {
			img, err = newImage(b, si)
		}
		if err == nil && si.Custom.Class().String() != cls {
			err = fmt.Errorf("the stored target %s is for class %s", si.Target, si.Custom.Class())
		}
		if err != nil {
			c.log.Warn("cached image no longer offered to its class until the next check", "class", cls, "sha256", sha, "err", err)
			delete(c.st.Current, cls)
			delete(c.st.Targets, cls)
			continue
		}
		c.current[si.Custom.Class()] = img
		c.st.Targets[cls] = si
	}
	// Bytes no class is offered are never served: drop them.
	inUse := map[string]bool{}
	for _, img := range c.current {
		inUse[img.sha] = true
	}
	for sha, b := range c.blobs {
		if !inUse[sha] {
			b.close()
			delete(c.blobs, sha)
			delete(c.st.Images, sha)
		}
	}
	// Files no state names are leftovers (crash mid-download): remove.
	entries, _ := os.ReadDir(c.imageDir())
	for _, e := range entries {
		if _, ok := c.blobs[e.Name()]; !ok {
			_ = os.Remove(filepath.Join(c.imageDir(), e.Name()))
		}
	}
	return nil
}

func (c *Cache) openVerified(sha string, length int64) (*blob, error) {
	want, err := hex.DecodeString(sha)
	if err != nil || len(want) != 32 {
		return nil, fmt.Errorf("image name %q is not a sha256", sha)
	}
	f, err := os.Open(filepath.Join(c.imageDir(), sha))
	if err != nil {
		return nil, err
	}
	if err := verifyFile(f, length, want); err != nil {
		f.Close()
		return nil, err
	}
	b := &blob{sha: sha, size: length, f: f}
	copy(b.tag[:], want)
	if b.m, err = mapFile(f, length); err != nil && length > 0 {
		c.log.Info("firmware image served from its file, not mapped", "sha256", sha, "err", err)
	}
	return b, nil
}

// coapBody is what a CoAP transfer reads: the mapping when there is one
// (no syscall per block), the file otherwise.
func (img *blob) coapBody() io.ReadSeeker {
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
func (img *blob) close() {
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
	for _, b := range c.blobs {
		b.close()
	}
	for _, b := range c.retired {
		b.close()
	}
	c.blobs, c.current, c.retired = map[string]*blob{}, map[Class]*image{}, nil
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
	classes, classesErr := c.devices.Classes()
	if classesErr != nil {
		// Unreadable is not "none enrolled": every class held now stays
		// (its image kept, and updated), none is added.
		classesErr = fmt.Errorf("enrolled device classes unreadable, the classes already cached are kept: %w", classesErr)
		c.mu.RLock()
		for cl := range c.current {
			enrolled[cl] = true
		}
		c.mu.RUnlock()
	}
	for _, cl := range classes {
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

	// Bound the cache: the newest image of every enrolled class must fit
	// (bytes that two classes share count once: they are stored once).
	var total int64
	counted := map[string]bool{}
	for _, cl := range sortedClasses(want) {
		sha := hex.EncodeToString(want[cl].sha256)
		if counted[sha] {
			continue
		}
		if total+want[cl].tf.Length > c.cfg.MaxCacheBytes {
			refusals = append(refusals, fmt.Errorf("class %s: image %s of %d bytes does not fit in ota.max_cache_bytes %d with the other enrolled classes", cl, want[cl].path, want[cl].tf.Length, c.cfg.MaxCacheBytes))
			delete(want, cl)
			continue
		}
		counted[sha] = true
		total += want[cl].tf.Length
	}

	// Download what is missing: bytes already held, or fetched in this
	// check for another class, are not fetched again.
	fresh, freshStored := map[string]*blob{}, map[string]storedImage{}
	unfetched := map[Class]bool{} // the link failed, not the image
	for _, cl := range sortedClasses(want) {
		cand := want[cl]
		sha := hex.EncodeToString(cand.sha256)
		c.mu.RLock()
		_, have := c.blobs[sha]
		c.mu.RUnlock()
		if have || fresh[sha] != nil {
			continue
		}
		b, err := c.download(ctx, up, cand)
		if err != nil {
			refusals = append(refusals, fmt.Errorf("class %s: target %s refused: %w", cl, cand.path, err))
			delete(want, cl)
			if !errors.Is(err, ErrImageMismatch) {
				unfetched[cl] = true
			}
			continue
		}
		fresh[sha] = b
		// With the target an older bastiond reads, should it be started again.
		freshStored[sha] = storedImage{Target: cand.path, Length: b.size, Custom: cand.tc}
		c.count(func(k *Counters) { k.ImagesDownloaded++ })
	}

	// Swap in the new state.
	var changed []Class
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		for _, b := range fresh {
			b.close()
		}
		return errors.New("ota-cache closed during check")
	}
	for sha, b := range fresh {
		c.blobs[sha] = b
		c.st.Images[sha] = freshStored[sha]
	}
	newCurrent := map[Class]*image{}
	for cl, cand := range want {
		if old := c.current[cl]; old != nil && old.sameTarget(cand) {
			newCurrent[cl] = old
			continue
		}
		newCurrent[cl] = &image{blob: c.blobs[hex.EncodeToString(cand.sha256)], target: cand.path, tc: cand.tc, ver: cand.ver}
	}
	// A class whose new image could not be fetched (a failed or stalled
	// download, not an image that failed verification: that one is never
	// answered with an older) keeps offering the image it has, verified
	// before, if that still fits.
	used, usedBytes := map[string]bool{}, int64(0)
	for _, img := range newCurrent {
		if !used[img.sha] {
			used[img.sha], usedBytes = true, usedBytes+img.size
		}
	}
	for _, cl := range sortedClasses(unfetched) {
		old := c.current[cl]
		if old == nil {
			continue
		}
		if !used[old.sha] {
			if usedBytes+old.size > c.cfg.MaxCacheBytes {
				refusals = append(refusals, fmt.Errorf("class %s: its image %s no longer fits in ota.max_cache_bytes %d with the other enrolled classes: nothing offered", cl, old.sha, c.cfg.MaxCacheBytes))
				continue
			}
			used[old.sha], usedBytes = true, usedBytes+old.size
		}
		newCurrent[cl] = old
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
	c.st.Current, c.st.Targets = map[string]string{}, map[string]storedImage{}
	inUse := map[string]bool{}
	for cl, img := range newCurrent {
		c.st.Current[cl.String()] = img.sha
		c.st.Targets[cl.String()] = storedImage{Target: img.target, Length: img.size, Custom: img.tc}
		inUse[img.sha] = true
	}
	// Evict the bytes no enrolled class is offered any more.
	for sha, b := range c.blobs {
		if inUse[sha] {
			continue
		}
		delete(c.blobs, sha)
		delete(c.st.Images, sha)
		_ = os.Remove(filepath.Join(c.imageDir(), sha))
		c.retire(b)
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
	if classesErr != nil {
		c.log.Warn("firmware check", "err", classesErr)
		c.setAlarm("devices", classesErr.Error())
	} else {
		c.clearAlarm("devices")
	}
	c.notify(changed)
	return errors.Join(append([]error{classesErr}, refusals...)...)
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
func (c *Cache) retire(b *blob) {
	c.retired = append(c.retired, b)
	time.AfterFunc(c.cfg.EvictGrace, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if i := slices.Index(c.retired, b); i >= 0 {
			c.retired = slices.Delete(c.retired, i, i+1)
			b.close()
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
			when := "never fetched"
			if !c.st.ValidUntil.IsZero() {
				when = "expired " + c.st.ValidUntil.UTC().Format(time.RFC3339)
			}
			s.Alarms = append(s.Alarms, "no valid vendor metadata ("+when+"): nothing is offered")
		}
	}
	for _, k := range slices.Sorted(maps.Keys(c.alarms)) {
		s.Alarms = append(s.Alarms, c.alarms[k])
	}
	for _, b := range c.blobs {
		s.Bytes += b.size
	}
	for _, img := range c.current {
		s.Images = append(s.Images, ImageInfo{Class: img.tc.Class(), Version: img.tc.Version, Sequence: img.tc.Sequence, Size: img.size, SHA256: img.sha, Target: img.target})
	}
	sort.Slice(s.Images, func(i, j int) bool {
		a, b := s.Images[i], s.Images[j]
		return a.SHA256 < b.SHA256 || a.SHA256 == b.SHA256 && a.Class.String() < b.Class.String()
	})
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

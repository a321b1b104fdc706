package otacache

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// testRepo is a vendor TUF repository made by the test with go-tuf's
// metadata API (ed25519 keys for root, targets, snapshot, timestamp) and
// served over HTTPS on 127.0.0.1. Its files live in memory so tests can
// tamper with exactly what the gateway downloads.
type testRepo struct {
	t         testing.TB
	keys      map[string]ed25519.PrivateKey
	vendorKey ed25519.PrivateKey
	root      *metadata.Metadata[metadata.RootType]
	targets   *metadata.Metadata[metadata.TargetsType]
	snapshot  *metadata.Metadata[metadata.SnapshotType]
	timestamp *metadata.Metadata[metadata.TimestampType]
	// TimestampExpires is used by the next publish.
	timestampExpires time.Time

	mu    sync.Mutex
	files map[string][]byte // URL path → body
	srv   *httptest.Server
}

func newTestRepo(t testing.TB) *testRepo {
	t.Helper()
	r := &testRepo{t: t, keys: map[string]ed25519.PrivateKey{}, files: map[string][]byte{}}
	_, r.vendorKey, _ = ed25519.GenerateKey(rand.Reader)
	exp := time.Now().Add(30 * 24 * time.Hour).UTC().Truncate(time.Second)
	r.timestampExpires = time.Now().Add(24 * time.Hour).UTC().Truncate(time.Second)
	r.root = metadata.Root(exp)
	r.root.Signed.ConsistentSnapshot = false
	r.targets = metadata.Targets(exp)
	r.snapshot = metadata.Snapshot(exp)
	r.timestamp = metadata.Timestamp(exp)
	for _, role := range []string{metadata.ROOT, metadata.TARGETS, metadata.SNAPSHOT, metadata.TIMESTAMP} {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		r.keys[role] = priv
		k, err := metadata.KeyFromPublicKey(priv.Public())
		if err != nil {
			t.Fatal(err)
		}
		if err := r.root.Signed.AddKey(k, role); err != nil {
			t.Fatal(err)
		}
	}
	r.signRoot()
	r.srv = httptest.NewTLSServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	r.targets.Signed.Version = 0 // first publish makes it 1
	r.snapshot.Signed.Version = 0
	r.timestamp.Signed.Version = 0
	return r
}

func (r *testRepo) serve(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	b, ok := r.files[req.URL.Path]
	r.mu.Unlock()
	if !ok {
		http.NotFound(w, req)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	_, _ = w.Write(b)
}

func (r *testRepo) put(p string, b []byte) {
	r.mu.Lock()
	r.files[p] = b
	r.mu.Unlock()
}

func (r *testRepo) get(p string) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.files[p]
}

func signerFor(t testing.TB, k ed25519.PrivateKey) signature.Signer {
	s, err := signature.LoadSigner(k, crypto.Hash(0))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (r *testRepo) signRoot() {
	r.root.ClearSignatures()
	if _, err := r.root.Sign(signerFor(r.t, r.keys[metadata.ROOT])); err != nil {
		r.t.Fatal(err)
	}
	b, err := r.root.ToBytes(false)
	if err != nil {
		r.t.Fatal(err)
	}
	r.put("/metadata/root.json", b)
	r.put("/metadata/"+strconv.FormatInt(r.root.Signed.Version, 10)+".root.json", b)
}

// rootJSON is what the gateway's configuration ships.
func (r *testRepo) rootJSON() []byte { return r.get("/metadata/1.root.json") }

func (r *testRepo) client() *http.Client { return r.srv.Client() }

func (r *testRepo) url() string { return r.srv.URL + "/metadata" }

// addImage adds a firmware target signed by the vendor and returns its
// target path and sha256.
func (r *testRepo) addImage(cl Class, version string, seq uint64, data []byte) (string, string) {
	r.t.Helper()
	p := "fw/" + cl.Vendor + "/" + cl.Model + "/" + version + ".bin"
	return p, r.addImageAt(p, cl, version, seq, data)
}

func (r *testRepo) addImageAt(p string, cl Class, version string, seq uint64, data []byte) string {
	r.t.Helper()
	sum := sha256.Sum256(data)
	man, err := SignManifest(Manifest{ManifestVersion: 1, SequenceNumber: seq, VendorID: cl.Vendor, ClassID: cl.Model,
		Version: version, ImageSize: int64(len(data)), ImageDigest: sum[:]}, r.vendorKey)
	if err != nil {
		r.t.Fatal(err)
	}
	custom, err := json.Marshal(map[string]any{"bastion": TargetCustom{Vendor: cl.Vendor, Model: cl.Model, Version: version, Sequence: seq, Manifest: man}})
	if err != nil {
		r.t.Fatal(err)
	}
	raw := json.RawMessage(custom)
	tf := &metadata.TargetFiles{Length: int64(len(data)), Hashes: metadata.Hashes{"sha256": sum[:]}, Custom: &raw}
	r.targets.Signed.Targets[p] = tf
	r.put("/metadata/targets/"+p, data)
	dir, base := path.Split(p)
	r.put("/metadata/targets/"+dir+hex.EncodeToString(sum[:])+"."+base, data)
	return hex.EncodeToString(sum[:])
}

// snapshotFiles captures the currently served top-level metadata, to replay
// it later (rollback and mix-and-match attacks).
func (r *testRepo) snapshotFiles() map[string][]byte {
	out := map[string][]byte{}
	for _, n := range []string{"timestamp.json", "snapshot.json", "targets.json"} {
		out["/metadata/"+n] = r.get("/metadata/" + n)
	}
	return out
}

// publish signs new versions of targets, snapshot and timestamp.
func (r *testRepo) publish() {
	r.t.Helper()
	r.targets.Signed.Version++
	r.signAndPut(metadata.TARGETS, r.targets, r.keys[metadata.TARGETS])
	r.snapshot.Signed.Version++
	r.snapshot.Signed.Meta["targets.json"] = metadata.MetaFile(r.targets.Signed.Version)
	r.signAndPut(metadata.SNAPSHOT, r.snapshot, r.keys[metadata.SNAPSHOT])
	r.timestamp.Signed.Version++
	r.timestamp.Signed.Expires = r.timestampExpires
	r.timestamp.Signed.Meta["snapshot.json"] = metadata.MetaFile(r.snapshot.Signed.Version)
	r.signAndPut(metadata.TIMESTAMP, r.timestamp, r.keys[metadata.TIMESTAMP])
}

type signable interface {
	ClearSignatures()
	Sign(signature.Signer) (*metadata.Signature, error)
	ToBytes(bool) ([]byte, error)
}

func (r *testRepo) signAndPut(role string, m signable, key ed25519.PrivateKey) {
	r.t.Helper()
	m.ClearSignatures()
	if _, err := m.Sign(signerFor(r.t, key)); err != nil {
		r.t.Fatal(err)
	}
	b, err := m.ToBytes(false)
	if err != nil {
		r.t.Fatal(err)
	}
	r.put("/metadata/"+role+".json", b)
	var v int64
	switch mm := m.(type) {
	case *metadata.Metadata[metadata.TargetsType]:
		v = mm.Signed.Version
	case *metadata.Metadata[metadata.SnapshotType]:
		v = mm.Signed.Version
	}
	if v > 0 {
		r.put("/metadata/"+strconv.FormatInt(v, 10)+"."+role+".json", b)
	}
}

// fakeDevices is the gateway's device registry as the cache sees it.
type fakeDevices struct {
	mu sync.Mutex
	m  map[string]DeviceInfo
}

func newFakeDevices(m map[string]DeviceInfo) *fakeDevices { return &fakeDevices{m: m} }

func (f *fakeDevices) Device(id string) (DeviceInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.m[id]
	return d, ok
}

func (f *fakeDevices) Classes() []Class {
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := map[Class]bool{}
	var out []Class
	for _, d := range f.m {
		if !seen[d.Class] {
			seen[d.Class] = true
			out = append(out, d.Class)
		}
	}
	return out
}

func (f *fakeDevices) set(id string, d DeviceInfo) {
	f.mu.Lock()
	f.m[id] = d
	f.mu.Unlock()
}

func (f *fakeDevices) remove(id string) {
	f.mu.Lock()
	delete(f.m, id)
	f.mu.Unlock()
}

var (
	classA = Class{Vendor: "acme", Model: "th-10"}
	classB = Class{Vendor: "globex", Model: "plug-2"}
)

// image returns deterministic pseudo-random bytes.
func testImage(n int, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

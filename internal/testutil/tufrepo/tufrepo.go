// Package tufrepo is a vendor TUF repository for tests: go-tuf's metadata
// API with ed25519 keys for root, targets, snapshot and timestamp, served
// over HTTPS on 127.0.0.1 by httptest. Its files live in memory, so tests
// can tamper with exactly what a client downloads. It knows nothing of
// Bastion's target custom metadata: callers pass it (ota-cache's tests and
// the gateway tests build it with otacache.SignManifest). It never listens
// anywhere but loopback.
package tufrepo

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"path"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/sigstore/sigstore/pkg/signature"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// Repo is one vendor repository. Tests may change the metadata fields and
// Keys directly between Publish calls (attacks: wrong key, rollback ...).
type Repo struct {
	t         testing.TB
	Keys      map[string]ed25519.PrivateKey
	Root      *metadata.Metadata[metadata.RootType]
	Targets   *metadata.Metadata[metadata.TargetsType]
	Snapshot  *metadata.Metadata[metadata.SnapshotType]
	Timestamp *metadata.Metadata[metadata.TimestampType]
	// TimestampExpires is used by the next Publish.
	TimestampExpires time.Time

	mu    sync.Mutex
	files map[string][]byte // URL path → body
	srv   *httptest.Server
}

// New makes a repository with fresh keys and a signed root (version 1)
// and starts its HTTPS server; t's cleanup stops it.
func New(t testing.TB) *Repo {
	t.Helper()
	r := &Repo{t: t, Keys: map[string]ed25519.PrivateKey{}, files: map[string][]byte{}}
	exp := time.Now().Add(30 * 24 * time.Hour).UTC().Truncate(time.Second)
	r.TimestampExpires = time.Now().Add(24 * time.Hour).UTC().Truncate(time.Second)
	r.Root = metadata.Root(exp)
	r.Root.Signed.ConsistentSnapshot = false
	r.Targets = metadata.Targets(exp)
	r.Snapshot = metadata.Snapshot(exp)
	r.Timestamp = metadata.Timestamp(exp)
	for _, role := range []string{metadata.ROOT, metadata.TARGETS, metadata.SNAPSHOT, metadata.TIMESTAMP} {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		r.Keys[role] = priv
		k, err := metadata.KeyFromPublicKey(priv.Public())
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Root.Signed.AddKey(k, role); err != nil {
			t.Fatal(err)
		}
	}
	r.SignRoot()
	r.srv = httptest.NewTLSServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	r.Targets.Signed.Version = 0 // first Publish makes it 1
	r.Snapshot.Signed.Version = 0
	r.Timestamp.Signed.Version = 0
	return r
}

func (r *Repo) serve(w http.ResponseWriter, req *http.Request) {
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

// Put serves b at URL path p.
func (r *Repo) Put(p string, b []byte) {
	r.mu.Lock()
	r.files[p] = b
	r.mu.Unlock()
}

// Get returns what is served at URL path p.
func (r *Repo) Get(p string) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.files[p]
}

// Clear stops serving every file (the vendor's server lost everything).
func (r *Repo) Clear() {
	r.mu.Lock()
	r.files = map[string][]byte{}
	r.mu.Unlock()
}

// Close stops the HTTPS server (the vendor is unreachable).
func (r *Repo) Close() { r.srv.Close() }

func signerFor(t testing.TB, k ed25519.PrivateKey) signature.Signer {
	s, err := signature.LoadSigner(k, crypto.Hash(0))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// SignRoot signs and serves the root as root.json and {version}.root.json.
func (r *Repo) SignRoot() {
	r.Root.ClearSignatures()
	if _, err := r.Root.Sign(signerFor(r.t, r.Keys[metadata.ROOT])); err != nil {
		r.t.Fatal(err)
	}
	b, err := r.Root.ToBytes(false)
	if err != nil {
		r.t.Fatal(err)
	}
	r.Put("/metadata/root.json", b)
	r.Put("/metadata/"+strconv.FormatInt(r.Root.Signed.Version, 10)+".root.json", b)
}

// RootJSON is the trusted root a client ships with (version 1).
func (r *Repo) RootJSON() []byte { return r.Get("/metadata/1.root.json") }

// Client is an HTTP client that trusts the repository's certificate.
func (r *Repo) Client() *http.Client { return r.srv.Client() }

// CertPEM is the repository server's certificate (a client's CA bundle).
func (r *Repo) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.srv.Certificate().Raw})
}

// CertPool trusts the repository server.
func (r *Repo) CertPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(r.srv.Certificate())
	return p
}

// URL is the https:// base of the metadata; targets are below URL()+"/targets".
func (r *Repo) URL() string { return r.srv.URL + "/metadata" }

// AddTarget adds (or replaces) target p with data and custom metadata
// (JSON-marshalled; nil for none), served both plain and hash-prefixed,
// and returns its sha256 in hex. It is published by the next Publish.
func (r *Repo) AddTarget(p string, data []byte, custom any) string {
	r.t.Helper()
	sum := sha256.Sum256(data)
	tf := &metadata.TargetFiles{Length: int64(len(data)), Hashes: metadata.Hashes{"sha256": sum[:]}}
	if custom != nil {
		b, err := json.Marshal(custom)
		if err != nil {
			r.t.Fatal(err)
		}
		raw := json.RawMessage(b)
		tf.Custom = &raw
	}
	r.Targets.Signed.Targets[p] = tf
	r.Put("/metadata/targets/"+p, data)
	dir, base := path.Split(p)
	r.Put("/metadata/targets/"+dir+hex.EncodeToString(sum[:])+"."+base, data)
	return hex.EncodeToString(sum[:])
}

// SnapshotFiles captures the currently served top-level metadata, to
// replay it later (rollback and mix-and-match attacks).
func (r *Repo) SnapshotFiles() map[string][]byte {
	out := map[string][]byte{}
	for _, n := range []string{"timestamp.json", "snapshot.json", "targets.json"} {
		out["/metadata/"+n] = r.Get("/metadata/" + n)
	}
	return out
}

// Publish signs and serves new versions of targets, snapshot and timestamp.
func (r *Repo) Publish() {
	r.t.Helper()
	r.Targets.Signed.Version++
	r.signAndPut(metadata.TARGETS, r.Targets, r.Keys[metadata.TARGETS])
	r.Snapshot.Signed.Version++
	r.Snapshot.Signed.Meta["targets.json"] = metadata.MetaFile(r.Targets.Signed.Version)
	r.signAndPut(metadata.SNAPSHOT, r.Snapshot, r.Keys[metadata.SNAPSHOT])
	r.Timestamp.Signed.Version++
	r.Timestamp.Signed.Expires = r.TimestampExpires
	r.Timestamp.Signed.Meta["snapshot.json"] = metadata.MetaFile(r.Snapshot.Signed.Version)
	r.signAndPut(metadata.TIMESTAMP, r.Timestamp, r.Keys[metadata.TIMESTAMP])
}

type signable interface {
	ClearSignatures()
	Sign(signature.Signer) (*metadata.Signature, error)
	ToBytes(bool) ([]byte, error)
}

func (r *Repo) signAndPut(role string, m signable, key ed25519.PrivateKey) {
	r.t.Helper()
	m.ClearSignatures()
	if _, err := m.Sign(signerFor(r.t, key)); err != nil {
		r.t.Fatal(err)
	}
	b, err := m.ToBytes(false)
	if err != nil {
		r.t.Fatal(err)
	}
	r.Put("/metadata/"+role+".json", b)
	var v int64
	switch mm := m.(type) {
	case *metadata.Metadata[metadata.TargetsType]:
		v = mm.Signed.Version
	case *metadata.Metadata[metadata.SnapshotType]:
		v = mm.Signed.Version
	}
	if v > 0 {
		r.Put("/metadata/"+strconv.FormatInt(v, 10)+"."+role+".json", b)
	}
}

// Image returns n deterministic pseudo-random bytes for seed.
func Image(n int, seed byte) []byte {
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

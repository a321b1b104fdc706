package otacache

import (
	"crypto/ed25519"
	"crypto/rand"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
)

// testRepo is the vendor TUF repository of internal/testutil/tufrepo
// (served over HTTPS on 127.0.0.1) plus the vendor's manifest key.
type testRepo struct {
	*tufrepo.Repo
	t         testing.TB
	vendorKey ed25519.PrivateKey
}

func newTestRepo(t testing.TB) *testRepo {
	t.Helper()
	_, vk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &testRepo{Repo: tufrepo.New(t), t: t, vendorKey: vk}
}

func (r *testRepo) put(p string, b []byte)           { r.Put(p, b) }
func (r *testRepo) get(p string) []byte              { return r.Get(p) }
func (r *testRepo) rootJSON() []byte                 { return r.RootJSON() }
func (r *testRepo) client() *http.Client             { return r.Client() }
func (r *testRepo) url() string                      { return r.URL() }
func (r *testRepo) publish()                         { r.Publish() }
func (r *testRepo) snapshotFiles() map[string][]byte { return r.SnapshotFiles() }

// addImage adds a firmware target signed by the vendor and returns its
// target path and sha256.
func (r *testRepo) addImage(cl Class, version string, seq uint64, data []byte) (string, string) {
	r.t.Helper()
	p := "fw/" + cl.Vendor + "/" + cl.Model + "/" + version + ".bin"
	return p, r.addImageAt(p, cl, version, seq, data)
}

func (r *testRepo) addImageAt(p string, cl Class, version string, seq uint64, data []byte) string {
	r.t.Helper()
	custom, err := VendorTargetCustom(cl, version, seq, data, r.vendorKey)
	if err != nil {
		r.t.Fatal(err)
	}
	return r.AddTarget(p, data, custom)
}

// fakeDevices is the gateway's device registry as the cache sees it.
type fakeDevices struct {
	mu sync.Mutex
	m  map[string]DeviceInfo
	// classesErr, if set, is what Classes returns.
	classesErr error
}

func newFakeDevices(m map[string]DeviceInfo) *fakeDevices { return &fakeDevices{m: m} }

func (f *fakeDevices) Device(id string) (DeviceInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.m[id]
	return d, ok
}

func (f *fakeDevices) Classes() ([]Class, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.classesErr != nil {
		return nil, f.classesErr
	}
	seen := map[Class]bool{}
	var out []Class
	for _, d := range f.m {
		if !seen[d.Class] {
			seen[d.Class] = true
			out = append(out, d.Class)
		}
	}
	return out, nil
}

func (f *fakeDevices) failClasses(err error) {
	f.mu.Lock()
	f.classesErr = err
	f.mu.Unlock()
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

func testImage(n int, seed byte) []byte { return tufrepo.Image(n, seed) }

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

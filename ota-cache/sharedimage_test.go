package otacache

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// openImageFDs counts the process's descriptors open on files of the
// cache's image directory (unlinked ones included).
func openImageFDs(t *testing.T, dir string) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	prefix := filepath.Join(dir, "images") + "/"
	n := 0
	for _, fd := range fds {
		if p, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && strings.HasPrefix(p, prefix) {
			n++
		}
	}
	return n
}

// TestClassesSharingImageBytes: two classes whose targets are the same
// bytes each get their own target (class, version, sequence, manifest),
// also after a restart; the bytes are downloaded, stored and opened once,
// and stay while any class is offered them.
func TestClassesSharingImageBytes(t *testing.T) {
	f := newFixture(t)
	data := testImage(20_000, 70)
	_, sha := f.repo.addImage(classA, "1.1.0", 3, data)
	if _, shaB := f.repo.addImage(classB, "2.1", 4, data); shaB != sha {
		t.Fatalf("same bytes, two sha256s: %s, %s", sha, shaB)
	}
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}

	checkOffers := func(t *testing.T, c *Cache, when string) {
		t.Helper()
		for dev, want := range map[string]struct {
			cl  Class
			ver string
			seq uint64
		}{"dev-a": {classA, "1.1.0", 3}, "dev-b": {classB, "2.1", 4}} {
			o, ok := c.Offer(dev)
			if !ok || o.Class != want.cl || o.Version != want.ver || o.Sequence != want.seq || o.SHA256 != sha {
				t.Errorf("%s: offer to %s = %+v, %v; want class %s version %s sequence %d", when, dev, o, ok, want.cl, want.ver, want.seq)
				continue
			}
			m, err := VerifyManifest(o.Manifest, f.repo.vendorKey.Public())
			if err != nil || m.ClassID != want.cl.Model || m.VendorID != want.cl.Vendor {
				t.Errorf("%s: manifest offered to %s: %+v, %v; want class %s's", when, dev, m, err, want.cl)
			}
			if _, err := c.imageForServe(dev, FirmwareRef{SHA256: sha}); err != nil {
				t.Errorf("%s: %s fetching /fw/sha256/%s: %v", when, dev, sha, err)
			}
		}
	}
	checkOffers(t, c, "after the check")
	if got := c.Status().Counters.ImagesDownloaded; got != 1 {
		t.Errorf("downloads = %d, want 1 (the same bytes for both classes)", got)
	}
	if st := c.Status(); st.Bytes != int64(len(data)) || len(st.Images) != 2 {
		t.Errorf("status: %d bytes in %d images, want %d bytes (stored once) in 2 (one per class)", st.Bytes, len(st.Images), len(data))
	}
	if d := cmp.Diff([]string{sha}, imageFiles(t, f.dir)); d != "" {
		t.Errorf("image files (-want +got):\n%s", d)
	}
	if n := openImageFDs(t, f.dir); n != 1 {
		t.Errorf("%d descriptors open on image files, want 1", n)
	}

	// A check that finds nothing new changes nothing and announces nothing.
	changed := 0
	cancel := c.Subscribe(func(Class) { changed++ })
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	cancel()
	if changed != 0 {
		t.Errorf("a check with nothing new announced %d changes", changed)
	}

	c.Close()
	if n := openImageFDs(t, f.dir); n != 0 {
		t.Errorf("%d descriptors open on image files after Close, want 0", n)
	}
	c = f.open(t)
	checkOffers(t, c, "after a restart")

	// Class B moves on; class A still uses the bytes, which stay.
	_, shaB2 := f.repo.addImage(classB, "2.2", 5, testImage(20_000, 71))
	f.repo.publish()
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if o, ok := c.Offer("dev-a"); !ok || o.SHA256 != sha || o.Class != classA {
		t.Errorf("dev-a after class B moved on: %+v, %v; want class A's %s", o, ok, sha)
	}
	if _, err := c.imageForServe("dev-a", FirmwareRef{SHA256: sha}); err != nil {
		t.Errorf("dev-a fetching its image after class B moved on: %v", err)
	}
	if _, err := c.imageForServe("dev-b", FirmwareRef{SHA256: sha}); err == nil {
		t.Error("dev-b still served class A's image after class B moved on")
	}
	want := []string{sha, shaB2}
	sort.Strings(want) // imageFiles lists them by name
	if d := cmp.Diff(want, imageFiles(t, f.dir)); d != "" {
		t.Errorf("image files (-want +got):\n%s", d)
	}
	// No class A device left: the bytes go.
	f.devices.remove("dev-a")
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{shaB2}, imageFiles(t, f.dir)); d != "" {
		t.Errorf("image files once class A is gone (-want +got):\n%s", d)
	}
}

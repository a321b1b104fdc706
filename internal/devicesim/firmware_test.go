package devicesim

import (
	"bytes"
	"encoding/json"
	"os"
	"testing"

	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// FuzzParseOffer feeds ParseOffer what a gateway (or anyone on the path
// before the DTLS/TLS session) could send. Seed: testdata/offer.json, a
// real offer as the gateway marshals it in gateway/firmware_test.go.
func FuzzParseOffer(f *testing.F) {
	seed, err := os.ReadFile("testdata/offer.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte{})
	f.Add(bytes.Replace(seed, []byte(`/fw/sha256/`), []byte(`/fw/acme/`), 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		o, ok, err := ParseOffer(b)
		if err != nil || !ok {
			return
		}
		// Whatever is accepted names its own content and re-encodes to
		// something accepted again.
		if o.Path != "/fw/sha256/"+o.SHA256 || o.Size <= 0 || len(o.Manifest) == 0 {
			t.Fatalf("accepted offer %+v", o)
		}
		re, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok, err := ParseOffer(re); err != nil || !ok {
			t.Fatalf("re-encoded offer refused: %v", err)
		}
	})
}

func TestParseOfferRefusals(t *testing.T) {
	seed, err := os.ReadFile("testdata/offer.json")
	if err != nil {
		t.Fatal(err)
	}
	if o, ok, err := ParseOffer(seed); err != nil || !ok || o.Version == "" {
		t.Fatalf("seed offer: %+v %v %v", o, ok, err)
	}
	var o otacache.Offer
	json.Unmarshal(seed, &o)
	for name, mut := range map[string]func(o *otacache.Offer){
		"path elsewhere": func(o *otacache.Offer) { o.Path = "/fw/acme/th-10" },
		"other sha path": func(o *otacache.Offer) { o.Path = "/fw/sha256/" + string(bytes.Repeat([]byte("a"), 64)) },
		"zero size":      func(o *otacache.Offer) { o.Size = 0 },
		"no manifest":    func(o *otacache.Offer) { o.Manifest = nil },
		"path traversal": func(o *otacache.Offer) { o.Path = "/fw/sha256/../../etc" },
	} {
		c := o
		mut(&c)
		b, _ := json.Marshal(c)
		if _, ok, err := ParseOffer(b); err == nil || ok {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, ok, err := ParseOffer(nil); err != nil || ok {
		t.Errorf("empty payload: ok %v err %v, want no offer and no error", ok, err)
	}
}

package est

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"testing"
)

func pakeKeys(t testing.TB, b byte) PAKEKeys {
	t.Helper()
	k, err := NewPAKEKeys(bytes.Repeat([]byte{b}, 32))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestPAKESealEnroll(t *testing.T) {
	k := pakeKeys(t, 1)
	exp := bytes.Repeat([]byte{7}, ExporterSize)
	csr := []byte("a csr")
	msg, err := k.SealEnroll(exp, csr)
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.OpenEnroll(exp, msg)
	if err != nil || !bytes.Equal(got, csr) {
		t.Fatalf("OpenEnroll = %q %v, want %q", got, err, csr)
	}
	flipped := bytes.Clone(msg)
	flipped[3] ^= 1
	other := bytes.Repeat([]byte{8}, ExporterSize)
	cases := map[string]func() error{
		"another exchange's key": func() error { _, err := pakeKeys(t, 2).OpenEnroll(exp, msg); return err },
		"another connection":     func() error { _, err := k.OpenEnroll(other, msg); return err },
		"altered CSR":            func() error { _, err := k.OpenEnroll(exp, flipped); return err },
		"truncated":              func() error { _, err := k.OpenEnroll(exp, msg[:len(msg)-1]); return err },
		"empty":                  func() error { _, err := k.OpenEnroll(exp, nil); return err },
		// The device's message is not the gateway's answer, whatever its shape.
		"reflected as an answer": func() error { _, _, err := k.OpenIssued(exp, csr, msg); return err },
	}
	for name, f := range cases {
		if err := f(); !errors.Is(err, ErrBadSeal) {
			t.Errorf("%s: err = %v, want ErrBadSeal", name, err)
		}
	}
}

func TestPAKESealIssued(t *testing.T) {
	k := pakeKeys(t, 1)
	exp := bytes.Repeat([]byte{7}, ExporterSize)
	csr, cert, ca := []byte("csr"), []byte("cert"), []byte("ca chain")
	msg, err := k.SealIssued(exp, csr, cert, ca)
	if err != nil {
		t.Fatal(err)
	}
	gc, gca, err := k.OpenIssued(exp, csr, msg)
	if err != nil || !bytes.Equal(gc, cert) || !bytes.Equal(gca, ca) {
		t.Fatalf("OpenIssued = %q %q %v", gc, gca, err)
	}
	// An answer to another CSR (another exchange's, replayed) is refused.
	if _, _, err := k.OpenIssued(exp, []byte("other csr"), msg); !errors.Is(err, ErrBadSeal) {
		t.Errorf("answer to another CSR: err = %v, want ErrBadSeal", err)
	}
	// The CA chain swapped for another is refused.
	forged := bytes.Clone(msg)
	forged[len(forged)-macSize-1] ^= 1
	if _, _, err := k.OpenIssued(exp, csr, forged); !errors.Is(err, ErrBadSeal) {
		t.Errorf("altered CA chain: err = %v, want ErrBadSeal", err)
	}
	if _, err := k.OpenEnroll(exp, msg); !errors.Is(err, ErrBadSeal) {
		t.Errorf("answer reflected as a request: err = %v, want ErrBadSeal", err)
	}
}

func TestNewPAKEKeys(t *testing.T) {
	// One key per direction: a message can never pass as the other side's.
	if k := pakeKeys(t, 1); bytes.Equal(k.device, k.gateway) {
		t.Error("the device's and the gateway's MAC keys are the same")
	}
	if bytes.Equal(pakeKeys(t, 1).device, pakeKeys(t, 2).device) {
		t.Error("two exchanges' keys give the same MAC key")
	}
	if _, err := NewPAKEKeys(make([]byte, 16)); err == nil {
		t.Error("16-byte key accepted")
	}
	if _, err := (PAKEKeys{}).SealEnroll(make([]byte, ExporterSize), nil); err == nil {
		t.Error("zero PAKEKeys sealed a message")
	}
}

// FuzzPAKEOpen: whatever arrives, Open refuses it or returns fields that
// seal back to the same bytes. Each input is also opened with its MAC
// made right (the last 32 bytes replaced by the MAC of the rest under the
// target's keys): an input's MAC almost never verifies, and the parser
// behind it would go unfuzzed. The seeds in testdata/fuzz/FuzzPAKEOpen
// are real sealed messages (SOURCES.md), under another exchange's keys.
func FuzzPAKEOpen(f *testing.F) {
	k := pakeKeys(f, 1)
	exp := bytes.Repeat([]byte{7}, ExporterSize)
	csr := []byte("csr")
	m1, _ := k.SealEnroll(exp, csr)
	m2, _ := k.SealIssued(exp, csr, []byte("cert"), []byte("ca"))
	f.Add(m1)
	f.Add(m2)
	f.Add([]byte{})
	f.Add([]byte{1, 0xff, 0xff})
	bound := sha256.Sum256(csr)
	f.Fuzz(func(t *testing.T, b []byte) {
		enroll, issued := b, b
		if len(b) >= macSize {
			body := b[:len(b)-macSize]
			enroll = append(bytes.Clone(body), mac(k.device, "enroll", exp, nil, body)...)
			issued = append(bytes.Clone(body), mac(k.gateway, "issued", exp, bound[:], body)...)
		}
		for _, m := range [][]byte{b, enroll} {
			if got, err := k.OpenEnroll(exp, m); err == nil {
				again, err := k.SealEnroll(exp, got)
				if err != nil || !bytes.Equal(again, m) {
					t.Fatalf("enroll round trip: %v", err)
				}
			}
		}
		for _, m := range [][]byte{b, issued} {
			if c, ca, err := k.OpenIssued(exp, csr, m); err == nil {
				again, err := k.SealIssued(exp, csr, c, ca)
				if err != nil || !bytes.Equal(again, m) {
					t.Fatalf("issued round trip: %v", err)
				}
			}
		}
	})
}

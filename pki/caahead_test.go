package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A CA created while the clock ran ahead is valid only from then: once the
// clock is put right every chain to it fails, which re-issuing certificates
// cannot cure. Open logs an error that says what to do (it does not
// refuse: a box whose clock is behind until NTP sets it must still start),
// and recreates nothing; a running CA says so when it re-issues a server
// certificate.
func TestCACreatedWhileClockAhead(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	const jump = 30 * 24 * time.Hour
	clk := &fakeClock{now: time.Now().Add(jump)}
	var logs bytes.Buffer
	ca, err := Open(dir, "test", clk, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	sans := []string{"localhost"}
	sc, err := ca.ServerCert("mqtt", sans, 48*time.Hour, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caCrt, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	clk.Add(-jump)

	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := ParseCSR(csrPEM(t, key))
	dev, err := ca.IssueDevice(csr, "dev1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.VerifyDevice([][]byte{dev.Raw}); err == nil {
		t.Fatal("test setup: a device certificate from the CA created ahead verifies after the clock was put right")
	}

	logs.Reset()
	if issued, err := sc.Refresh(sans); err != nil || !issued {
		t.Fatalf("Refresh after the clock was put right: issued %v, %v; want the certificate re-issued", issued, err)
	}
	if l := logs.String(); !strings.Contains(l, "level=ERROR") || !strings.Contains(l, "CA is not valid yet") {
		t.Errorf("re-issuing a server certificate under a CA not valid yet logged no error:\n%s", l)
	}

	logs.Reset()
	if _, err := Open(dir, "test", clk, slog.New(slog.NewTextHandler(&logs, nil))); err != nil {
		t.Fatalf("Open of a CA valid only from a month ahead: %v; want it loaded and the error logged (a box whose clock is behind until NTP must still start)", err)
	}
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Errorf("Open of a CA valid only from a month ahead logged no error:\n%s", logs.String())
	}
	for _, want := range []string{"the CA in " + dir + " is valid only from", "mv " + dir + " " + dir + ".ahead", "enrolled again"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("Open logged:\n%s\nwant it to say %q", logs.String(), want)
		}
	}
	if now, _ := os.ReadFile(filepath.Join(dir, "ca.crt")); !bytes.Equal(now, caCrt) {
		t.Error("Open replaced the CA")
	}

	clk.bad = true
	if _, err := Open(dir, "test", clk, discard); err != nil {
		t.Errorf("Open with the clock not set: %v; want the CA loaded (the clock is waited for, not blamed on the CA)", err)
	}
}

// A clock stepped back a little after the CA was created does not stop
// it: the CA is valid from an hour before its creation, and Open lets its
// start be 5 minutes ahead (caAheadSlack).
func TestCALoadedWithClockSlightlyBehind(t *testing.T) {
	_, clk, dir := newCA(t)
	back := time.Hour + 4*time.Minute
	clk.Add(-back)
	if _, err := Open(dir, "test", clk, discard); err != nil {
		t.Errorf("Open with the clock %v behind the CA's creation: %v", back, err)
	}
}

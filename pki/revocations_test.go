package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
	"time"
)

// A device renewing every hour leaves one retirement per renewal: those of
// expired certificates are dropped (the chain check refuses them as
// expired), so the set holds about as many as are still valid, and a
// retired certificate that is still valid stays refused.
func TestRetirementsOfExpiredCertsDropped(t *testing.T) {
	ca, clk, _ := newCA(t)
	revs := ca.Revocations()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := ParseCSR(csrPEM(t, key))
	if err != nil {
		t.Fatal(err)
	}
	const validity, every, renewals = 24 * time.Hour, time.Hour, 500

	kept, err := ca.IssueDevice(csr, "dev1", renewals*every+time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	revs.RetireCert(Serial(kept), clk.Now(), kept.NotAfter)
	expiring, err := ca.IssueDevice(csr, "dev1", validity)
	if err != nil {
		t.Fatal(err)
	}
	revs.RetireCert(Serial(expiring), clk.Now(), expiring.NotAfter)

	for i := range renewals {
		now := clk.Now()
		revs.RetireCert(fmt.Sprintf("renewed-%d", i), now.Add(10*time.Minute), now.Add(validity))
		clk.Add(every)
	}
	revs.mu.RLock()
	n := len(revs.retire)
	revs.mu.RUnlock()
	if max := int(validity/every) + 2; n > max {
		t.Errorf("after %d renewals, %d retirements kept; want at most %d (the certificates still valid)", renewals, n, max)
	}
	if _, ok := revs.RetireAt(Serial(expiring)); ok {
		t.Error("the retirement of an expired certificate was kept")
	}
	if _, _, err := ca.VerifyDevice([][]byte{expiring.Raw}); err == nil || errors.Is(err, ErrRevoked) {
		t.Errorf("expired certificate whose retirement was dropped: %v, want refused as expired", err)
	}
	if _, _, err := ca.VerifyDevice([][]byte{kept.Raw}); !errors.Is(err, ErrCertRetired) {
		t.Errorf("retired certificate still valid after %d renewals: %v, want ErrCertRetired", renewals, err)
	}
	if err := ca.CertValid("dev1", Serial(kept), kept.NotAfter); !errors.Is(err, ErrCertRetired) {
		t.Errorf("CertValid of the retired certificate still valid: %v, want ErrCertRetired", err)
	}
}

// RetireSerial moves a retirement made by RetireCert earlier and keeps its
// end, so it is still dropped once expired.
func TestRetireSerialKeepsEnd(t *testing.T) {
	clk := &fakeClock{now: time.Now()}
	revs := NewRevocations(clk)
	end := clk.Now().Add(time.Hour)
	revs.RetireCert("a", clk.Now().Add(10*time.Minute), end)
	revs.RetireSerial("a", clk.Now())
	if !revs.Retired("a", clk.Now()) {
		t.Error("RetireSerial did not move the retirement earlier")
	}
	revs.RetireSerial("a", clk.Now().Add(time.Minute))
	if !revs.Retired("a", clk.Now()) {
		t.Error("RetireSerial with a later time moved the retirement later")
	}
	clk.Add(time.Hour + time.Nanosecond)
	revs.RetireCert("b", clk.Now(), clk.Now().Add(time.Hour))
	if _, ok := revs.RetireAt("a"); ok {
		t.Error("a retirement moved by RetireSerial was kept past its certificate's end")
	}
}

// An unset clock judges no certificate expired, so it drops nothing.
func TestRetirementsKeptWhileClockNotSet(t *testing.T) {
	clk := &fakeClock{now: time.Now()}
	revs := NewRevocations(clk)
	revs.RetireCert("a", clk.Now(), clk.Now().Add(time.Hour))
	clk.Add(2 * time.Hour)
	clk.bad = true
	revs.RetireCert("b", clk.Now(), clk.Now().Add(time.Hour))
	if !revs.Retired("a", clk.Now()) {
		t.Error("a retirement was dropped while the clock is not set")
	}
}

// One retirement drops at most retirePruneMax expired ones (the lock it
// holds stalls every handshake), and the rest at the following ones.
func TestRetirementPruneBounded(t *testing.T) {
	clk := &fakeClock{now: time.Now()}
	revs := NewRevocations(clk)
	const expired = 3 * retirePruneMax
	for i := range expired {
		revs.RetireCert(fmt.Sprintf("old-%d", i), clk.Now(), clk.Now().Add(time.Hour))
	}
	clk.Add(2 * time.Hour)
	size := func() int { revs.mu.RLock(); defer revs.mu.RUnlock(); return len(revs.retire) }
	revs.RetireCert("new-0", clk.Now(), clk.Now().Add(time.Hour))
	if got, want := size(), expired+1-retirePruneMax; got != want {
		t.Errorf("after one retirement: %d kept, want %d (%d expired dropped)", got, want, retirePruneMax)
	}
	for i := 1; i < 3; i++ {
		revs.RetireCert(fmt.Sprintf("new-%d", i), clk.Now(), clk.Now().Add(time.Hour))
	}
	if got := size(); got != 3 {
		t.Errorf("after three retirements: %d kept, want the 3 unexpired", got)
	}
}

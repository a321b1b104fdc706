package store

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
)

// serials is the serials of the certificate records stored, sorted.
func serials(t *testing.T, s *Store) []string {
	t.Helper()
	cs, err := s.Certs()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, c := range cs {
		out = append(out, c.Serial)
	}
	slices.Sort(out)
	return out
}

// lastTx is the id of the store's last committed write transaction.
func lastTx(t *testing.T, s *Store) int {
	t.Helper()
	var id int
	if err := s.db.View(func(tx *bolt.Tx) error { id = tx.ID(); return nil }); err != nil {
		t.Fatal(err)
	}
	return id
}

// A renewal deletes the records of renewed certificates that have
// expired; a renewed certificate still valid keeps its record (it is
// refused by its retirement until it expires), and so does an expired
// certificate that was not renewed (the console shows it). The records
// used to be kept for ever: a device renewing every hour left 8,760 a
// year, all read by every revocation and certificate view.
func TestRecordRenewalPrunesExpiredRenewedCerts(t *testing.T) {
	s, _ := open(t)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	cert := func(serial string, notAfter time.Time) Cert {
		return Cert{Serial: serial, Device: "d1", NotAfter: notAfter}
	}
	// 01 renewed by 02, 02 by 03 (all three expired by now); 10 renewed
	// by 11, still valid; 20 expired, never renewed.
	for _, c := range []Cert{cert("01", now.Add(-3*time.Hour)), cert("10", now.Add(time.Hour)), cert("20", now.Add(-time.Hour))} {
		if err := s.RecordCert(c); err != nil {
			t.Fatal(err)
		}
	}
	renew := func(old, renewed Cert, at time.Time) {
		t.Helper()
		old.RetireAt = at.Add(10 * time.Minute)
		if err := s.RecordRenewal(old, renewed, at); err != nil {
			t.Fatal(err)
		}
	}
	renew(cert("01", now.Add(-3*time.Hour)), cert("02", now.Add(-2*time.Hour)), now.Add(-4*time.Hour))
	// 01 ends at -3h: not yet expired at this renewal.
	renew(cert("02", now.Add(-2*time.Hour)), cert("03", now.Add(-time.Second)), now.Add(-3*time.Hour))
	renew(cert("10", now.Add(time.Hour)), cert("11", now.Add(2*time.Hour)), now.Add(-3*time.Hour))
	if d := cmp.Diff([]string{"01", "02", "03", "10", "11", "20"}, serials(t, s)); d != "" {
		t.Fatalf("records before any renewed certificate expired (-want +got):\n%s", d)
	}
	renew(cert("03", now.Add(-time.Second)), cert("04", now.Add(time.Hour)), now)
	// 03 is renewed now, past its end: deleted with the others.
	if d := cmp.Diff([]string{"04", "10", "11", "20"}, serials(t, s)); d != "" {
		t.Errorf("records after a renewal at %s (-want +got):\n%s", now, d)
	}
	if err := s.Check(); err != nil {
		t.Error(err)
	}
}

// Pruning deletes a bounded number of records per transaction, oldest
// first, says when more are left, and writes nothing when there is
// nothing to delete.
func TestPruneRetiredCertsBounded(t *testing.T) {
	s, _ := open(t)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	const expired = maxCertPrunes + 5
	err := s.db.Update(func(tx *bolt.Tx) error {
		for i := range expired + 1 {
			c := Cert{Serial: fmt.Sprintf("%06x", i), Device: "d1", NotAfter: now.Add(time.Duration(i-expired) * time.Second), RetireAt: now.Add(-48 * time.Hour)}
			if err := put(tx.Bucket(bCerts), c.Serial, c); err != nil {
				return err
			}
			if err := tx.Bucket(bRetired).Put(retiredKey(c), nil); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	n, more, err := s.PruneRetiredCerts(now)
	if err != nil || n != maxCertPrunes || !more {
		t.Fatalf("first pass: %d, more %v, %v; want %d and more", n, more, err, maxCertPrunes)
	}
	if got := serials(t, s); len(got) != 6 || got[0] != fmt.Sprintf("%06x", maxCertPrunes) {
		t.Fatalf("left after the first pass %v, want the newest 6 (the oldest deleted first)", got)
	}
	n, more, err = s.PruneRetiredCerts(now)
	if err != nil || n != 5 || more {
		t.Fatalf("second pass: %d, more %v, %v; want 5 and no more", n, more, err)
	}
	// Left: the one ending at now, which has not expired yet.
	if d := cmp.Diff([]string{fmt.Sprintf("%06x", expired)}, serials(t, s)); d != "" {
		t.Errorf("left (-want +got):\n%s", d)
	}
	tx := lastTx(t, s)
	if n, more, err := s.PruneRetiredCerts(now); err != nil || n != 0 || more {
		t.Errorf("with nothing to delete: %d, more %v, %v; want 0", n, more, err)
	}
	if got := lastTx(t, s); got != tx {
		t.Errorf("pruning with nothing to delete committed transaction %d (last was %d), want no write", got, tx)
	}
}

// A store written before renewed certificates were indexed gets its
// index at the next Open, so that their records are pruned too.
func TestOpenIndexesRenewedCertsOfAnOlderStore(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	for _, c := range []Cert{
		{Serial: "01", Device: "d1", NotAfter: now.Add(-time.Hour), RetireAt: now.Add(-2 * time.Hour)},
		{Serial: "02", Device: "d1", NotAfter: now.Add(time.Hour)},
	} {
		if err := s.RecordCert(c); err != nil {
			t.Fatal(err)
		}
	}
	// As the older version left it: no index.
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(bRetired) }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if s, err = Open(p); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, _, err := s.PruneRetiredCerts(now); err != nil || n != 1 {
		t.Errorf("pruned %d, %v; want 1", n, err)
	}
	if d := cmp.Diff([]string{"02"}, serials(t, s)); d != "" {
		t.Errorf("left (-want +got):\n%s", d)
	}
}

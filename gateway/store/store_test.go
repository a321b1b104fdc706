package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"

	"github.com/bastion-iot/bastion/internal/testutil/child"
)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, p
}

func TestDevices(t *testing.T) {
	s, p := open(t)
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("store file mode = %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	d := Device{ID: "a1", Name: "lamp", Auth: "psk", PSKIdentity: "psk-a1", Created: now}
	if err := s.AddDevice(d); err != nil {
		t.Fatal(err)
	}
	if err := s.AddDevice(Device{ID: "b2", Name: "lamp"}); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("duplicate name: got %v, want ErrNameTaken", err)
	}
	for name, get := range map[string]func() (Device, error){
		"id":   func() (Device, error) { return s.Device("a1") },
		"name": func() (Device, error) { return s.DeviceByName("lamp") },
		"psk":  func() (Device, error) { return s.DeviceByPSKIdentity("psk-a1") },
	} {
		got, err := get()
		if err != nil {
			t.Fatalf("by %s: %v", name, err)
		}
		if diff := cmp.Diff(d, got); diff != "" {
			t.Errorf("by %s (-want +got):\n%s", name, diff)
		}
	}
	if _, err := s.Device("zz"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing device: got %v", err)
	}
	if err := s.RecordCert(Cert{Serial: "01", Device: "a1", NotAfter: now}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateDevice("a1", func(d *Device) error { d.Name = "lamp2"; d.Revoked = true; return nil }); err != nil {
		t.Fatal(err)
	}
	got, _ := s.DeviceByName("lamp2")
	if got.ID != "a1" || got.Revoked {
		t.Errorf("rename: got %+v; want id a1, not revoked (Update cannot revoke)", got)
	}
	rd, err := s.Revoke("a1", now)
	if err != nil || !rd.Revoked || !rd.RevokedAt.Equal(now) {
		t.Fatalf("revoke: %+v %v", rd, err)
	}
	if _, err := s.DeviceByName("lamp2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("revoked device keeps its name: %v", err)
	}
	cs, _ := s.Certs()
	if len(cs) != 1 || !cs[0].Revoked {
		t.Errorf("certs after revoke: %+v; want the one cert revoked", cs)
	}
	if err := s.AddDevice(Device{ID: "c3", Name: "lamp2"}); err != nil {
		t.Errorf("name of a revoked device should be free: %v", err)
	}
	all, _ := s.Devices()
	if len(all) != 2 {
		t.Errorf("Devices() = %d, want 2", len(all))
	}
}

func TestAuditPaging(t *testing.T) {
	s, _ := open(t)
	for i := 1; i <= 5; i++ {
		seq, err := s.Audit(Event{Action: fmt.Sprint("a", i)})
		if err != nil || seq != uint64(i) {
			t.Fatalf("audit %d: seq %d err %v", i, seq, err)
		}
	}
	page, _ := s.AuditLog(2, 0)
	next, _ := s.AuditLog(2, page[1].Seq)
	tail, _ := s.AuditLog(10, 99)
	got := []string{page[0].Action, page[1].Action, next[0].Action, next[1].Action}
	if diff := cmp.Diff([]string{"a5", "a4", "a3", "a2"}, got); diff != "" {
		t.Errorf("paging (-want +got):\n%s", diff)
	}
	if len(tail) != 5 {
		t.Errorf("before beyond last: %d events, want 5", len(tail))
	}
}

// seqs is the sequence numbers of es.
func seqs(es []Event) []uint64 {
	out := make([]uint64, len(es))
	for i, e := range es {
		out[i] = e.Seq
	}
	return out
}

// descending is hi, hi-1, ..., lo.
func descending(hi, lo uint64) []uint64 {
	var out []uint64
	for s := hi; s >= lo && s > 0; s-- {
		out = append(out, s)
	}
	return out
}

// auditKeys is how many events the audit bucket holds.
func auditKeys(t *testing.T, s *Store) int {
	t.Helper()
	var n int
	if err := s.db.View(func(tx *bolt.Tx) error {
		n = tx.Bucket(bAudit).Stats().KeyN
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// The audit log keeps the newest events only: after keep+k events exactly
// the newest keep are left, with the sequence numbers they were written
// with, and paging through them with before still reaches each once and
// ends at the oldest kept.
func TestAuditRetention(t *testing.T) {
	const keep, k = 50, 17
	p := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(p, AuditRetention(keep))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 1; i <= keep+k; i++ {
		seq, err := s.Audit(Event{Action: fmt.Sprint("a", i)})
		if err != nil || seq != uint64(i) {
			t.Fatalf("audit %d: seq %d err %v", i, seq, err)
		}
		if want := min(i, keep); auditKeys(t, s) != want {
			t.Fatalf("after %d events the log holds %d, want %d", i, auditKeys(t, s), want)
		}
	}
	all, err := s.AuditLog(1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := descending(keep+k, k+1)
	if diff := cmp.Diff(want, seqs(all)); diff != "" {
		t.Fatalf("kept events (-want +got):\n%s", diff)
	}
	for _, e := range all {
		if e.Action != fmt.Sprint("a", e.Seq) {
			t.Errorf("event %d is %q, want a%d", e.Seq, e.Action, e.Seq)
		}
	}
	// Pages of 7 from the newest, each starting before the last one's
	// oldest, as the console and its API page.
	var paged []uint64
	var before uint64
	for range 100 {
		page, err := s.AuditLog(7, before)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		paged = append(paged, seqs(page)...)
		before = page[len(page)-1].Seq
	}
	if diff := cmp.Diff(want, paged); diff != "" {
		t.Errorf("paged (-want +got):\n%s", diff)
	}
	if page, _ := s.AuditLog(10, k+2); len(page) != 1 || page[0].Seq != k+1 {
		t.Errorf("before the second oldest kept: %v, want the oldest kept (%d) alone", seqs(page), k+1)
	}
	if page, _ := s.AuditLog(10, k+1); len(page) != 0 {
		t.Errorf("before the oldest kept: %v, want none", seqs(page))
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

// A log longer than the retention (kept by a version without one, or with
// a larger retention) is cut at Open, in transactions of at most
// maxAuditDrops deletions, and stays cut as events are added.
func TestAuditRetentionCutAtOpen(t *testing.T) {
	const old = 2*maxAuditDrops + 345
	s, p := open(t)
	// A long log written in one transaction: an event at a time would
	// fsync each.
	if err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bAudit)
		for i := 1; i <= old; i++ {
			seq, err := b.NextSequence()
			if err != nil {
				return err
			}
			if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), []byte(`{"seq":`+strconv.FormatUint(seq, 10)+`,"action":"old"}`)); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	const keep = 100
	s, err := Open(p, AuditRetention(keep))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n := auditKeys(t, s); n != keep {
		t.Fatalf("after Open the log holds %d events, want %d", n, keep)
	}
	seq, err := s.Audit(Event{Action: "new"})
	if err != nil || seq != old+1 {
		t.Fatalf("audit after the cut: seq %d err %v, want %d", seq, err, old+1)
	}
	all, _ := s.AuditLog(1000, 0)
	if diff := cmp.Diff(descending(old+1, old+2-keep), seqs(all)); diff != "" {
		t.Errorf("kept events (-want +got):\n%s", diff)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestLockedByOther(t *testing.T) {
	_, p := open(t)
	if _, err := Open(p); err == nil {
		t.Fatal("second Open of a held store succeeded")
	}
}

// The child writes devices and audit events as fast as it can and prints the
// number of each committed transaction; the parent kills it with SIGKILL and
// checks that every printed write survived and the file is consistent.
func TestSurvivesKill9(t *testing.T) {
	if p := os.Getenv("STORE_KILL_CHILD"); p != "" {
		s, err := Open(p)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
		ds, _ := s.Devices()
		for i := len(ds); ; i++ {
			if err := s.AddDevice(Device{ID: fmt.Sprint("d", i), Name: fmt.Sprint("n", i)}); err != nil {
				fmt.Println("ERR", err)
				os.Exit(1)
			}
			if _, err := s.Audit(Event{Action: "device.add", Target: fmt.Sprint("d", i)}); err != nil {
				fmt.Println("ERR", err)
				os.Exit(1)
			}
			fmt.Println(i)
		}
	}
	p := filepath.Join(t.TempDir(), "state.db")
	for round := 0; round < 3; round++ {
		cmd := child.DieWithTest(exec.Command(os.Args[0], "-test.run=^TestSurvivesKill9$"))
		cmd.Env = append(os.Environ(), "STORE_KILL_CHILD="+p)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		last := -1
		deadline := time.Now().Add(30 * time.Second)
		for sc.Scan() && time.Now().Before(deadline) {
			n, err := strconv.Atoi(sc.Text())
			if err != nil {
				t.Fatalf("child: %s", sc.Text())
			}
			last = n
			if n >= 60*(round+1)+round*7 { // kill at a different point each round
				break
			}
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		if last < 0 {
			t.Fatal("child committed nothing before the deadline")
		}
		s, err := Open(p)
		if err != nil {
			t.Fatalf("reopen after kill -9: %v", err)
		}
		if err := s.Check(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Device(fmt.Sprint("d", last)); err != nil {
			t.Errorf("round %d: acknowledged write d%d lost: %v", round, last, err)
		}
		ds, _ := s.Devices()
		ev, _ := s.AuditLog(1, 0)
		if len(ev) == 0 || len(ds) < last+1 {
			t.Errorf("round %d: %d devices, %d audit; want ≥ %d", round, len(ds), len(ev), last+1)
		}
		// The next round's child continues in the same file after this crash.
		s.Close()
	}
}

// The device lookups a handshake and a firmware block make, by PSK
// identity and by id: each answers from memory between writes.
var cachedLookups = []struct {
	name        string
	key, absent string // absent: the key of the device "b2" added later
	lookup      func(*Store, string) (Device, error)
	cache       func(*Store) *deviceCache
}{
	{"psk", "psk-a1", "psk-b2", (*Store).DeviceByPSKIdentity, func(s *Store) *deviceCache { return &s.psk }},
	{"id", "a1", "b2", (*Store).Device, func(s *Store) *deviceCache { return &s.byID }},
}

// storeWithLamp is a store holding PSK device a1 ("lamp", identity psk-a1).
func storeWithLamp(t *testing.T) (*Store, time.Time) {
	t.Helper()
	s, _ := open(t)
	now := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	if err := s.AddDevice(Device{ID: "a1", Name: "lamp", Auth: "psk", PSKIdentity: "psk-a1", Created: now}); err != nil {
		t.Fatal(err)
	}
	return s, now
}

// A lookup after a write that changed the device sees the change.
func TestDeviceLookupCache(t *testing.T) {
	for _, tc := range cachedLookups {
		t.Run(tc.name, func(t *testing.T) {
			s, now := storeWithLamp(t)
			if _, err := tc.lookup(s, tc.key); err != nil {
				t.Fatal(err)
			}
			// Answered from memory: reading the file allocated a transaction and
			// the decoded record.
			if n := testing.AllocsPerRun(100, func() { _, _ = tc.lookup(s, tc.key) }); n != 0 {
				t.Errorf("cached lookup: %v allocations, want 0", n)
			}
			if _, err := s.UpdateDevice("a1", func(d *Device) error { d.Version = "2.0"; return nil }); err != nil {
				t.Fatal(err)
			}
			if d, err := tc.lookup(s, tc.key); err != nil || d.Version != "2.0" {
				t.Fatalf("after UpdateDevice: version %q, %v; want 2.0", d.Version, err)
			}
			if _, err := s.Revoke("a1", now); err != nil {
				t.Fatal(err)
			}
			if d, err := tc.lookup(s, tc.key); err != nil || !d.Revoked {
				t.Fatalf("after Revoke: revoked %v, %v; want true", d.Revoked, err)
			}
			if _, err := tc.lookup(s, tc.absent); !errors.Is(err, ErrNotFound) {
				t.Fatalf("unknown device: %v, want ErrNotFound", err)
			}
			if err := s.AddDevice(Device{ID: "b2", Name: "fan", Auth: "psk", PSKIdentity: "psk-b2", Created: now}); err != nil {
				t.Fatal(err)
			}
			if d, err := tc.lookup(s, tc.absent); err != nil || d.ID != "b2" {
				t.Fatalf("device added after a failed lookup: %q, %v; want b2", d.ID, err)
			}
		})
	}
}

// A lookup that read the device before a Revoke committed does not keep
// its answer: the next lookup sees the device revoked.
func TestDeviceLookupCacheRevokeDuringLookup(t *testing.T) {
	for _, tc := range cachedLookups {
		t.Run(tc.name, func(t *testing.T) {
			s, now := storeWithLamp(t)
			c := tc.cache(s)
			c.afterRead = func() {
				c.afterRead = nil
				if _, err := s.Revoke("a1", now); err != nil {
					t.Error(err)
				}
			}
			if d, err := tc.lookup(s, tc.key); err != nil || d.Revoked {
				t.Fatalf("lookup that began before Revoke: revoked %v, %v; want the device as it was read", d.Revoked, err)
			}
			if d, err := tc.lookup(s, tc.key); err != nil || !d.Revoked {
				t.Fatalf("lookup after Revoke: revoked %v, %v; want true", d.Revoked, err)
			}
		})
	}
}

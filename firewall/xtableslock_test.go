package firewall

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/bastion-iot/bastion/internal/testenv"
	tnetns "github.com/bastion-iot/bastion/internal/testutil/netns"
)

// TestRealLegacyCommitGivesUpOnAHeldLock: with legacy iptables and the
// xtables lock held by another program, a commit fails once its lock wait
// (xtablesWait) is over, saying why, instead of waiting for as long as the
// lock is held (a bare --wait) with Apply's lock, and a reload's, held
// behind it. And a commit whose context ends first says that it did.
//
// The lock is a file of the test's own (XTABLES_LOCKFILE), not the box's
// /run/xtables.lock, which every other legacy iptables user shares.
func TestRealLegacyCommitGivesUpOnAHeldLock(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	list := testenv.RequireCommand(t, "iptables-legacy")
	restore := testenv.RequireCommand(t, "iptables-legacy-restore")
	ns := tnetns.New(t, "xtlock")
	lock := filepath.Join(t.TempDir(), "xtables.lock")
	t.Setenv("XTABLES_LOCKFILE", lock)
	b := &iptablesBackend{family: IPv4, list: list, restore: restore, netns: ns.Name}
	ops := []Op{{Kind: OpNewChain, Chain: "BASTION-LOCKTEST"}}

	// The backend works with the lock free: what fails below is the wait.
	if err := b.Commit(context.Background(), ops); err != nil {
		t.Fatalf("commit with the lock free: %v", err)
	}
	f, err := os.OpenFile(lock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	// Far longer than the lock wait: if this deadline is what ends the
	// commit, the commit was waiting for the lock without a bound.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err = b.Commit(ctx, ops)
	if ctx.Err() != nil {
		t.Fatalf("commit still waiting for the held xtables lock after 60 s (it ended with the test's deadline: %v); want it to give up after %s s", err, xtablesWait)
	}
	if err == nil || !strings.Contains(err.Error(), "xtables lock") {
		t.Fatalf("commit with the lock held: %v, want an error about the xtables lock", err)
	}

	short, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := b.Commit(short, ops); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("commit killed when its context ended: %v, want an error saying the deadline passed", err)
	}
}

package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// TestWriteConfigFile: the written file reads back as the configuration
// it was written from, with mode 0600 also where an earlier write that
// stopped half-way left a world-readable .tmp behind; a write that fails
// leaves the old file as it was. (That the data and the rename are synced
// to disk cannot be seen from a test without a power cut.)
func TestWriteConfigFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bastion.yaml")
	if err := os.WriteFile(path+".tmp", []byte("half a file"), 0o644); err != nil {
		t.Fatal(err)
	}
	want := config.Dev(dir)
	want.GatewayID = "gw-write"
	if err := WriteConfigFile(path, want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("config file mode %v, want 0600 (it holds the box's settings)", fi.Mode().Perm())
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left behind: %v", err)
	}
	got, err := config.Load(path, config.Dev(dir))
	if err != nil {
		t.Fatalf("load the written file: %v", err)
	}
	if d := cmp.Diff(want, got, cmpopts.EquateEmpty()); d != "" {
		t.Errorf("written config read back (-want +got):\n%s", d)
	}
	old, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}

	// A .tmp that cannot be replaced (a non-empty directory) fails the write.
	if err := os.MkdirAll(filepath.Join(path+".tmp", "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	other := config.Dev(dir)
	other.GatewayID = "gw-other"
	err = WriteConfigFile(path, other)
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("write with an unusable temporary file: %v, want an error naming %s", err, path)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(old) {
		t.Errorf("a failed write changed the file:\n%s", after)
	}
}

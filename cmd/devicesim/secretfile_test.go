package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// keygen writes the private key 0600 also over an existing world-readable
// file (os.WriteFile would keep its 0644), and the CSR beside it as before.
func TestKeygenKeyMode(t *testing.T) {
	dir := t.TempDir()
	key, csr := filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.csr")
	if err := os.WriteFile(key, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(key, 0o644); err != nil { // whatever the umask
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	if rc := run([]string{"keygen", key, csr}, &out, &errb); rc != 0 {
		t.Fatalf("keygen: exit %d: %s", rc, errb.String())
	}
	checkSecret(t, key, "PRIVATE KEY")
	if b, err := os.ReadFile(csr); err != nil || !strings.Contains(string(b), "CERTIFICATE REQUEST") {
		t.Errorf("CSR %s: %q, %v", csr, b, err)
	}
}

// writeSecret makes a new file 0600, replaces an existing 0644 one with a
// 0600 one, and leaves no temporary file behind.
func TestWriteSecret(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "creds.json")
	if err := writeSecret(p, []byte(`{"psk":"a"}`)); err != nil {
		t.Fatal(err)
	}
	checkSecret(t, p, `"a"`)
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeSecret(p, []byte(`{"psk":"b"}`)); err != nil {
		t.Fatal(err)
	}
	checkSecret(t, p, `"b"`)
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 1 {
		t.Errorf("directory holds %d entries (%v), want only creds.json", len(ents), err)
	}
	if err := writeSecret(filepath.Join(dir, "missing", "creds.json"), []byte("x")); err == nil {
		t.Error("writeSecret into a directory that does not exist: no error")
	}
}

// checkSecret fails unless path is mode 0600 and holds want.
func checkSecret(t *testing.T, path, want string) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Errorf("%s: mode %v, want 0600", path, m)
	}
	if b, err := os.ReadFile(path); err != nil || !strings.Contains(string(b), want) {
		t.Errorf("%s: %q, %v; want it to hold %s", path, b, err, want)
	}
}

package boottest

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestSetupCode runs the appliance's setup-code script (what the console
// banner shows as the first-admin code) against journals made by fake
// systemctl and journalctl first on PATH. A LAN host can get any text into
// bastiond's log (a refused DTLS peer's PSK identity is logged), so text
// that looks like the code in a log line must never be shown: only
// bastiond's own summary line of the running start counts.
func TestSetupCode(t *testing.T) {
	script, err := filepath.Abs("../rootfs/usr/lib/bastion/setup-code")
	if err != nil {
		t.Fatal(err)
	}
	const (
		real    = "ABCD-EFGH-IJKL-MNOP"
		older   = "QRST-UVWX-YZ23-4567"
		spoofed = "AAAA-BBBB-CCCC-DDDD"
	)
	summary := func(code string) string {
		return "  setup code: " + code + "   (one-time: creates the first console admin)"
	}
	// What a peer sends as its PSK identity, logged through bastiond's own
	// handlers: the summary line itself, with and without a newline before
	// it, and the bare words.
	var spoofs []string
	for _, identity := range []string{summary(spoofed), "\n" + summary(spoofed), "setup code: " + spoofed} {
		for _, h := range []func(*bytes.Buffer) slog.Handler{
			func(b *bytes.Buffer) slog.Handler { return slog.NewTextHandler(b, nil) },
			func(b *bytes.Buffer) slog.Handler { return slog.NewJSONHandler(b, nil) },
		} {
			var b bytes.Buffer
			slog.New(h(&b)).Warn("coap: handshake refused: PSK identity not accepted", "psk_identity", identity)
			spoofs = append(spoofs, strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")...)
		}
	}
	if len(spoofs) != 6 {
		t.Fatalf("a log line with a newline in a value became several lines:\n%s", strings.Join(spoofs, "\n"))
	}
	for _, tc := range []struct {
		name      string
		run, boot []string // this start's journal; earlier starts of this boot
		want      string
	}{
		{"spoofed after the real line", slices.Concat([]string{summary(real)}, spoofs), nil, real},
		{"spoofed before the real line", slices.Concat(spoofs, []string{summary(real)}), nil, real},
		{"spoofed only (an admin exists: no code)", spoofs, nil, ""},
		{"an earlier start's code", []string{summary(real)}, []string{summary(older)}, real},
		{"first of this start", []string{summary(real), summary(older)}, nil, real},
		{"not a whole summary line", []string{"x" + summary(spoofed), summary(spoofed) + " x", " " + summary(spoofed)}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write := func(name, body string, mode os.FileMode) {
				t.Helper()
				if err := os.WriteFile(filepath.Join(dir, name), []byte(body), mode); err != nil {
					t.Fatal(err)
				}
			}
			write("run.journal", strings.Join(tc.run, "\n")+"\n", 0o644)
			write("boot.journal", strings.Join(slices.Concat(tc.boot, tc.run), "\n")+"\n", 0o644)
			write("systemctl", `#!/bin/sh
[ "$*" = "show -p InvocationID --value bastiond.service" ] || { echo "unexpected systemctl $*" >&2; exit 1; }
echo 7a1c0de5
`, 0o755)
			// This start's lines only with its invocation's match; anything
			// else gets the whole boot, earlier starts included.
			write("journalctl", `#!/bin/sh
d=$(dirname "$0")
for a in "$@"; do
	[ "$a" = _SYSTEMD_INVOCATION_ID=7a1c0de5 ] && exec cat "$d/run.journal"
done
exec cat "$d/boot.journal"
`, 0o755)
			cmd := exec.Command("sh", script)
			cmd.Env = append(os.Environ(), "PATH="+dir+":/usr/sbin:/usr/bin:/sbin:/bin")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("setup-code: %v: %s", err, stderr.String())
			}
			if got := strings.TrimSuffix(string(out), "\n"); got != tc.want {
				t.Errorf("setup-code printed %q, want %q; journal of this start:\n%s", got, tc.want, strings.Join(tc.run, "\n"))
			}
		})
	}
}

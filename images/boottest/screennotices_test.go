package boottest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/bastion-iot/bastion/internal/testenv"
)

// TestScreenNotices runs the appliance's screen-notices script (what
// bastion-screen.service shows on the box's consoles as "Bastion: ...")
// against a journal from a fake journalctl, with a pseudo-terminal as the
// only active console. The script is the shipped one, unchanged: it sets its
// own PATH and writes to /dev/<console>, so it runs in a mount namespace of
// its own where the fake journalctl is bind-mounted over the real one and
// the pty's name over /sys/class/tty/console/active.
//
// A LAN host can get any text into bastiond's log (a refused DTLS peer's
// PSK identity is logged), so a log line that merely carries a notice's
// words must never become a notice: only bastiond's own lines for a pairing
// window opening or closing and for a console recovery code count.
func TestScreenNotices(t *testing.T) {
	testenv.RequireRoot(t)
	script, err := filepath.Abs("../rootfs/usr/lib/bastion/screen-notices")
	if err != nil {
		t.Fatal(err)
	}
	const (
		realCode    = "ABCD-EFGH-IJKL-MNOP"
		spoofedCode = "AAAA-BBBB-CCCC-DDDD"
	)
	recovery := func(code string) string {
		return "console recovery code: " + code + " (valid 15 minutes, once): enter it on the console's password recovery page"
	}
	handlers := []func(io.Writer) slog.Handler{
		func(w io.Writer) slog.Handler { return slog.NewTextHandler(w, nil) },
		func(w io.Writer) slog.Handler { return slog.NewJSONHandler(w, nil) },
	}
	// lines logs through both of bastiond's handlers (log.format text and
	// json) and returns the lines each wrote.
	lines := func(log func(*slog.Logger)) []string {
		var out []string
		for _, h := range handlers {
			var b bytes.Buffer
			log(slog.New(h(&b)))
			out = append(out, strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")...)
		}
		return out
	}
	// bastiond's own notice lines, made as gateway/pairing.go makes them.
	opened := lines(func(l *slog.Logger) {
		l.Info("pairing window opened", "reason", "", "detail", "button keyboard held 1.5s; open for 2m0s")
	})
	closed := lines(func(l *slog.Logger) {
		l.Info("pairing window closed", "reason", "timeout", "detail", "open 2m0s, 0 failed attempts")
	})
	code := lines(func(l *slog.Logger) {
		l.Warn(recovery(realCode), "source", "pairing button held 10 s or more with no window open")
	})

	// What a peer sends as its PSK identity, logged as bridges/coap logs a
	// refused one: the notices' words, bastiond's whole notice lines, and
	// those after a newline.
	identities := []string{
		"pairing window opened",
		"pairing window ",
		recovery(spoofedCode),
		"console recovery code: ",
		`x msg="pairing window opened"`,
		`x","msg":"pairing window opened"}`,
	}
	for _, l := range slices.Concat(opened, closed) {
		identities = append(identities, l, "\n"+l)
	}
	var spoofs []string
	for _, identity := range identities {
		spoofs = append(spoofs, lines(func(l *slog.Logger) {
			l.Warn("coap: handshake refused: PSK identity not accepted",
				"device", "", "psk_identity", identity, "reason", "unknown_psk_identity", "err", "unknown PSK identity")
		})...)
	}
	if len(spoofs) != 2*len(identities) {
		t.Fatalf("a log line with a newline in a value became several lines:\n%s", strings.Join(spoofs, "\n"))
	}
	// Text around a whole notice line is not bastiond's line either.
	var notWhole []string
	for _, l := range slices.Concat(opened, code) {
		notWhole = append(notWhole, "x"+l, " "+l)
	}
	notWhole = append(notWhole,
		strings.Replace(opened[0], `msg="pairing window opened"`, `msg="pairing window opened, call 555-0100"`, 1),
		strings.Replace(opened[1], `"msg":"pairing window opened"`, `"msg":"pairing window opened, call 555-0100"`, 1),
		strings.Replace(code[0], realCode, "ABCD-EFGH-IJKL-MNO", 1),
	)

	for _, tc := range []struct {
		name    string
		journal []string
		want    []string // the "Bastion: " lines shown, in order
	}{
		{"bastiond's own notices", slices.Concat(opened, closed, code), []string{
			"Bastion: pairing window opened", "Bastion: pairing window opened",
			"Bastion: pairing window closed", "Bastion: pairing window closed",
			"Bastion: " + recovery(realCode), "Bastion: " + recovery(realCode),
		}},
		{"spoofed in a PSK identity", spoofs, nil},
		{"not a whole notice line", notWhole, nil},
		{"spoofed around a real one", slices.Concat(spoofs, opened[:1], spoofs), []string{"Bastion: pairing window opened"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := screenNotices(t, script, tc.journal)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("notices on the console (-want +got):\n%s\njournal:\n%s", diff, strings.Join(tc.journal, "\n"))
			}
		})
	}
}

// screenNotices runs script with journal as bastiond's journal and returns
// the non-empty lines it wrote to the only active console.
func screenNotices(t *testing.T, script string, journal []string) []string {
	t.Helper()
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ptmx, pts := openPTY(t)
	defer pts.Close()
	active := write("active", strings.TrimPrefix(pts.Name(), "/dev/")+"\n", 0o644)
	journalFile := write("journal", strings.Join(journal, "\n")+"\n", 0o644)
	journalctl := write("journalctl", fmt.Sprintf(`#!/bin/sh
[ "$*" = "-f -n 0 -q -o cat -u bastiond.service" ] || { echo "unexpected journalctl $*" >&2; exit 1; }
exec cat %q
`, journalFile), 0o755)

	// Read the console while the script writes it (a pty holds only a few
	// KiB); the read ends with EIO once no one has the pty open.
	var screen bytes.Buffer
	read := make(chan struct{})
	go func() {
		defer close(read)
		io.Copy(&screen, ptmx)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "-c",
		`mount --bind "$1" /usr/bin/journalctl && mount --bind "$2" /sys/class/tty/console/active && exec sh "$3"`,
		"sh", journalctl, active, script)
	// Go makes the new mount namespace's mounts private: the binds are
	// seen by the script only.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	err := cmd.Run()
	pts.Close()
	<-read
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("screen-notices: %v: %s", err, stderr.String())
	}
	var got []string
	for _, l := range strings.Split(screen.String(), "\n") {
		if l = strings.TrimRight(l, "\r"); l != "" {
			got = append(got, l)
		}
	}
	return got
}

// openPTY returns a new pseudo-terminal's master and its slave, which stays
// open until the caller closes it so that the master reads no hang-up
// between the script's writes. The master is closed when t ends.
func openPTY(t *testing.T) (ptmx, pts *os.File) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open a pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { ptmx.Close() })
	fd := int(ptmx.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlock the pseudo-terminal: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("pseudo-terminal number: %v", err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open the pseudo-terminal's slave: %v", err)
	}
	return ptmx, pts
}

package boottest

import (
	"bufio"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

//go:embed guest/bastion-test-report guest/bastion-test-report.service
var guestFiles embed.FS

// layout is images/out/layout.env: where the partitions start in the disk.
type layout map[string]string

func readLayout(dir string) (layout, error) {
	b, err := os.ReadFile(filepath.Join(dir, "layout.env"))
	if err != nil {
		return nil, fmt.Errorf("read image layout: %w (build the image with images/build.sh)", err)
	}
	l := layout{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if ok {
			l[k] = v
		}
	}
	for _, k := range []string{"ROOT_START", "STATE_START", "SECTOR_SIZE"} {
		if _, err := strconv.ParseInt(l[k], 10, 64); err != nil {
			return nil, fmt.Errorf("image layout %s: %s=%q is not a number", dir, k, l[k])
		}
	}
	return l, nil
}

func (l layout) offset(startKey string) int64 {
	start, _ := strconv.ParseInt(l[startKey], 10, 64)
	sector, _ := strconv.ParseInt(l["SECTOR_SIZE"], 10, 64)
	return start * sector
}

// makeTestDisk copies the shipped disk image and writes the report unit into
// the copy's root filesystem with debugfs (no loop device, no mount).
// extra maps host files to paths under /usr/local/share/bastion-boottest.
func makeTestDisk(t *testing.T, imageDir string, l layout, extra map[string]string) string {
	t.Helper()
	debugfs := testenv.RequireCommand(t, "debugfs")
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	if out, err := exec.Command("cp", "--sparse=always", filepath.Join(imageDir, "bastion-amd64.img"), disk).CombinedOutput(); err != nil {
		t.Fatalf("copy disk image: %v: %s", err, out)
	}
	for _, name := range []string{"bastion-test-report", "bastion-test-report.service"} {
		b, err := guestFiles.ReadFile("guest/" + name)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	script := filepath.Join(dir, "bastion-test-report")
	unit := filepath.Join(dir, "bastion-test-report.service")
	cmds := strings.Join([]string{
		"write " + script + " /usr/local/sbin/bastion-test-report",
		"sif /usr/local/sbin/bastion-test-report mode 0100755",
		"sif /usr/local/sbin/bastion-test-report uid 0",
		"sif /usr/local/sbin/bastion-test-report gid 0",
		"write " + unit + " /etc/systemd/system/bastion-test-report.service",
		"sif /etc/systemd/system/bastion-test-report.service uid 0",
		"sif /etc/systemd/system/bastion-test-report.service gid 0",
		"symlink /etc/systemd/system/multi-user.target.wants/bastion-test-report.service /etc/systemd/system/bastion-test-report.service",
		"mkdir /usr/local/share/bastion-boottest",
	}, "\n") + "\n"
	for name, host := range extra {
		cmds += "write " + host + " /usr/local/share/bastion-boottest/" + name + "\n"
		if strings.HasSuffix(name, ".test") { // a test binary the report runs
			cmds += "sif /usr/local/share/bastion-boottest/" + name + " mode 0100755\n"
		}
	}
	cmdFile := filepath.Join(dir, "debugfs.cmds")
	if err := os.WriteFile(cmdFile, []byte(cmds), 0o644); err != nil {
		t.Fatal(err)
	}
	fs := fmt.Sprintf("%s?offset=%d", disk, l.offset("ROOT_START"))
	if out, err := exec.Command(debugfs, "-w", "-f", cmdFile, fs).CombinedOutput(); err != nil {
		t.Fatalf("debugfs write test unit: %v: %s", err, out)
	}
	// debugfs exits 0 even when a command fails: read back what was written.
	out, err := exec.Command(debugfs, "-R", "cat /usr/local/sbin/bastion-test-report", fs).Output()
	want, _ := guestFiles.ReadFile("guest/bastion-test-report")
	if err != nil || string(out) != string(want) {
		t.Fatalf("test unit script was not written into the test disk (err %v, got %d bytes)", err, len(out))
	}
	out, err = exec.Command(debugfs, "-R", "stat /etc/systemd/system/multi-user.target.wants/bastion-test-report.service", fs).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Type: symlink") {
		t.Fatalf("test unit was not enabled in the test disk: %v: %s", err, out)
	}
	return disk
}

// lineLog keeps the lines read from one serial port and lets the test wait
// for a line matching a pattern.
type lineLog struct {
	name string
	mu   sync.Mutex
	all  []string
	wake chan struct{} // closed and replaced on every new line
	eof  bool
	file *os.File
}

func newLineLog(name, path string) (*lineLog, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	return &lineLog{name: name, wake: make(chan struct{}), file: f}, nil
}

func (l *lineLog) read(c net.Conn) {
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		l.mu.Lock()
		l.all = append(l.all, line)
		fmt.Fprintln(l.file, line)
		close(l.wake)
		l.wake = make(chan struct{})
		l.mu.Unlock()
	}
	l.mu.Lock()
	l.eof = true
	close(l.wake)
	l.wake = make(chan struct{})
	l.file.Close()
	l.mu.Unlock()
}

// waitFor returns the first line matching re, waiting until ctx ends.
func (l *lineLog) waitFor(ctx context.Context, re *regexp.Regexp) (string, error) {
	seen := 0
	for {
		l.mu.Lock()
		for ; seen < len(l.all); seen++ {
			if re.MatchString(l.all[seen]) {
				s := l.all[seen]
				l.mu.Unlock()
				return s, nil
			}
		}
		eof, wake := l.eof, l.wake
		l.mu.Unlock()
		if eof {
			return "", fmt.Errorf("%s closed before a line matching %q appeared", l.name, re)
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return "", fmt.Errorf("waiting on %s for %q: %w", l.name, re, ctx.Err())
		}
	}
}

func (l *lineLog) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.all...)
}

func (l *lineLog) tail(n int) string {
	all := l.lines()
	if len(all) > n {
		all = all[len(all)-n:]
	}
	return strings.Join(all, "\n")
}

// vm is one qemu process with its serial ports and QMP monitor.
type vm struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	console *lineLog // ttyS0: kernel, systemd and the product's banner
	report  *lineLog // ttyS1: the test unit's report
	qmp     net.Conn
	qmpR    *bufio.Reader
	wg      sync.WaitGroup
}

type forward struct {
	proto string
	guest int
	host  int
	bind  string // host-side address in the namespace; "" = 127.0.0.1
}

func (f forward) String() string { return fmt.Sprintf("%s/%d", f.proto, f.guest) }

// startVM boots kernel+initrd from imageDir with disk as the only drive, in
// TCG, inside ns (so the guest reaches nothing), with user-mode networking
// and the given forwards from the namespace's 127.0.0.1.
func startVM(ctx context.Context, t *testing.T, ns *netns, imageDir, disk string, fwds []forward, extraCmdline string) *vm {
	t.Helper()
	qemu := testenv.RequireCommand(t, "qemu-system-x86_64")
	ip := testenv.RequireCommand(t, "ip")
	cmdline, err := os.ReadFile(filepath.Join(imageDir, "cmdline"))
	if err != nil {
		t.Fatalf("read kernel command line: %v", err)
	}
	// Unix socket paths are limited to 108 bytes; t.TempDir can be longer.
	sockDir, err := os.MkdirTemp("", "bvm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	logDir := t.TempDir()

	listen := func(name string) *net.UnixListener {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(sockDir, name), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	lser0, lser1, lqmp := listen("s0"), listen("s1"), listen("q")
	defer lser0.Close()
	defer lser1.Close()
	defer lqmp.Close()

	var hostfwd []string
	for _, f := range fwds {
		bind := f.bind
		if bind == "" {
			bind = "127.0.0.1"
		}
		hostfwd = append(hostfwd, fmt.Sprintf("hostfwd=%s:%s:%d-:%d", f.proto, bind, f.host, f.guest))
	}
	args := []string{
		"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", filepath.Join(imageDir, "vmlinuz"),
		"-initrd", filepath.Join(imageDir, "initrd.img"),
		"-append", strings.TrimSpace(string(cmdline)) + " " + extraCmdline,
		"-drive", "file=" + disk + ",format=raw,if=virtio,cache=unsafe",
		"-netdev", "user,id=n0," + strings.Join(hostfwd, ","),
		"-device", "virtio-net-pci,netdev=n0",
		"-object", "rng-random,filename=/dev/urandom,id=rng0",
		"-device", "virtio-rng-pci,rng=rng0",
		// A keyboard attached to the box: the test holds its pairing key.
		"-device", "virtio-keyboard-pci,id=kbd0",
		"-chardev", "socket,id=ser0,path=" + filepath.Join(sockDir, "s0"),
		"-chardev", "socket,id=ser1,path=" + filepath.Join(sockDir, "s1"),
		"-serial", "chardev:ser0",
		"-serial", "chardev:ser1",
		"-chardev", "socket,id=mon0,path=" + filepath.Join(sockDir, "q"),
		"-mon", "chardev=mon0,mode=control",
	}
	v := &vm{exited: make(chan struct{})}
	// ip execs qemu in place: qemu itself gets the parent-death signal.
	v.cmd = child.DieWithTest(exec.Command(ip, append([]string{"netns", "exec", ns.name, qemu}, args...)...))
	qlog, err := os.Create(filepath.Join(logDir, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	v.cmd.Stdout, v.cmd.Stderr = qlog, qlog
	t.Logf("qemu %s", strings.Join(args, " "))
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() {
		v.waitErr = v.cmd.Wait()
		qlog.Close()
		close(v.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-v.exited:
		default:
			t.Log("qemu still running at cleanup: killing it")
			v.cmd.Process.Kill()
			<-v.exited
		}
		if v.qmp != nil {
			v.qmp.Close()
		}
		v.wg.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(logDir, "qemu.log"))
			t.Logf("qemu output:\n%s", b)
			if v.console != nil {
				t.Logf("serial console (last 80 lines):\n%s", v.console.tail(80))
			}
			if v.report != nil {
				t.Logf("test report port (last 80 lines):\n%s", v.report.tail(80))
			}
		}
	})

	accept := func(l *net.UnixListener) net.Conn {
		l.SetDeadline(time.Now().Add(30 * time.Second))
		c, err := l.Accept()
		if err != nil {
			b, _ := os.ReadFile(filepath.Join(logDir, "qemu.log"))
			t.Fatalf("qemu did not connect %s: %v\n%s", l.Addr(), err, b)
		}
		return c
	}
	// qemu connects its chardevs in command-line order while it starts.
	c0, c1, cq := accept(lser0), accept(lser1), accept(lqmp)
	if v.console, err = newLineLog("serial console", filepath.Join(logDir, "console.log")); err != nil {
		t.Fatal(err)
	}
	if v.report, err = newLineLog("report port", filepath.Join(logDir, "report.log")); err != nil {
		t.Fatal(err)
	}
	v.wg.Add(2)
	go func() { defer v.wg.Done(); defer c0.Close(); v.console.read(c0) }()
	go func() { defer v.wg.Done(); defer c1.Close(); v.report.read(c1) }()
	// The readers end when qemu exits and closes the sockets; make sure they
	// also end if the test gives up first.
	go func() {
		<-v.exited
		c0.Close()
		c1.Close()
	}()
	v.qmp = cq
	v.qmpR = bufio.NewReader(cq)
	if _, err := v.qmpCommand(ctx, "qmp_capabilities"); err != nil {
		t.Fatalf("qmp: %v", err)
	}
	t.Logf("serial and qemu logs in %s", logDir)
	return v
}

// holdKey holds the key (a QMP qcode, e.g. "scroll_lock") on the VM's
// keyboard for d, as a person pressing it.
func (v *vm) holdKey(ctx context.Context, qcode string, d time.Duration) error {
	key := func(down bool) error {
		// No "device": with -display none there is no console to bind
		// it to; events go to the one keyboard.
		_, err := v.qmpExecute(ctx, "input-send-event", map[string]any{"events": []any{
			map[string]any{"type": "key", "data": map[string]any{"down": down, "key": map[string]any{"type": "qcode", "data": qcode}}},
		}})
		return err
	}
	if err := key(true); err != nil {
		return err
	}
	time.Sleep(d) // the hold itself
	return key(false)
}

// qmpCommand runs one QMP command and returns its "return" value, skipping
// asynchronous events.
func (v *vm) qmpCommand(ctx context.Context, name string) (json.RawMessage, error) {
	return v.qmpExecute(ctx, name, nil)
}

// qmpExecute is qmpCommand with arguments (nil: none).
func (v *vm) qmpExecute(ctx context.Context, name string, args any) (json.RawMessage, error) {
	if dl, ok := ctx.Deadline(); ok {
		v.qmp.SetDeadline(dl)
	}
	cmd := map[string]any{"execute": name}
	if args != nil {
		cmd["arguments"] = args
	}
	b, err := json.Marshal(cmd)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", name, err)
	}
	if _, err := v.qmp.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", name, err)
	}
	for {
		line, err := v.qmpR.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: %w", name, err)
		}
		var msg struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &msg); err != nil {
			return nil, fmt.Errorf("qmp %s: bad reply %q: %w", name, line, err)
		}
		if msg.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s", name, msg.Error.Desc)
		}
		if msg.Return != nil {
			return msg.Return, nil
		}
	}
}

// powerOff presses the virtual power button and waits for qemu to exit.
func (v *vm) powerOff(ctx context.Context) error {
	if _, err := v.qmpCommand(ctx, "system_powerdown"); err != nil {
		return err
	}
	select {
	case <-v.exited:
		var ee *exec.ExitError
		if v.waitErr != nil && !errors.As(v.waitErr, &ee) {
			return fmt.Errorf("qemu: %w", v.waitErr)
		}
		if v.waitErr != nil {
			return fmt.Errorf("qemu exited with %w after power button", v.waitErr)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("guest did not power off after the power button: %w", ctx.Err())
	}
}

// section is one "=== BEGIN name" ... "=== END name rc=N" block of the report.
type section struct {
	body string
	rc   int
}

func parseReport(lines []string) (map[string]section, error) {
	out := map[string]section{}
	var cur string
	var body []string
	for _, line := range lines {
		switch {
		case strings.HasPrefix(line, "=== BEGIN "):
			cur = strings.TrimPrefix(line, "=== BEGIN ")
			body = nil
		case strings.HasPrefix(line, "=== END "):
			name, rcs, ok := strings.Cut(strings.TrimPrefix(line, "=== END "), " rc=")
			if !ok || name != cur {
				return nil, fmt.Errorf("report: malformed end line %q in section %q", line, cur)
			}
			rc, err := strconv.Atoi(rcs)
			if err != nil {
				return nil, fmt.Errorf("report: malformed rc in %q", line)
			}
			out[cur] = section{body: strings.Join(body, "\n"), rc: rc}
			cur = ""
		case cur != "":
			body = append(body, line)
		}
	}
	return out, nil
}

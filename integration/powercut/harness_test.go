package powercut

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// binaries builds bastiond and bastionctl once per test binary: the gateway
// under test is its own process, killed and restarted like the real one.
func binaries(tb testing.TB) (bastiond, bastionctl string) {
	tb.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "bastion-powercut-bin")
		if buildErr != nil {
			return
		}
		args := []string{"build", "-o", binDir}
		if os.Getenv("BENCH_PROFILE_DIR") != "" {
			// SIGUSR2 starts/stops a CPU profile (cmd/bastiond/profile_benchprof.go).
			args = append(args, "-tags", "benchprof")
		}
		args = append(args, "github.com/bastion-iot/bastion/cmd/bastiond", "github.com/bastion-iot/bastion/cmd/bastionctl")
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build bastiond bastionctl: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		tb.Fatal(buildErr)
	}
	return filepath.Join(binDir, "bastiond"), filepath.Join(binDir, "bastionctl")
}

// gwConfig is a --dev configuration on fixed free loopback ports with the
// upstream link pointing at broker (CA file, server name and client leaf
// as given).
func gwConfig(tb testing.TB, state string, b *mosquitto.Broker, caFile, serverName string, leaf *testpki.Leaf, gatewayID string) config.Config {
	cfg := config.Dev(state)
	cfg.CoAP.Listen = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb, "udp"))
	cfg.CoAP.PSKListen = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb, "udp"))
	cfg.MQTT.Listen = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb, "tcp"))
	cfg.Console.Enabled = false
	cfg.Log.Level = "info"
	cfg.Upstream.Enabled = true
	cfg.Upstream.Config = upstream.Config{
		Broker: "mqtts://" + b.Addr, ServerName: serverName, CAFile: caFile,
		CertFile: leaf.CertFile, KeyFile: leaf.KeyFile, Gateway: gatewayID,
		// Short backoff: the test waits for the reconnect after the
		// broker comes back, and should not wait a minute for it.
		BackoffMin: 50 * time.Millisecond, BackoffMax: 300 * time.Millisecond,
		Forward: []upstream.Rule{{Topic: "devices/+/t/#", Action: "forward"}},
	}
	cfg.Upstream.Config.Defaults()
	return cfg
}

// proc is one bastiond process and its log.
type proc struct {
	cmd  *exec.Cmd
	log  *logLines
	done chan struct{} // closed when the process has exited and its log is read
}

// logLines collects a process's log lines and lets a test wait for one.
type logLines struct {
	mu      sync.Mutex
	lines   []string
	changed chan struct{}
	closed  bool
}

func newLogLines() *logLines { return &logLines{changed: make(chan struct{})} }

func (l *logLines) add(s string) {
	l.mu.Lock()
	l.lines = append(l.lines, s)
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

func (l *logLines) close() {
	l.mu.Lock()
	l.closed = true
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

func (l *logLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// count is the number of lines containing s.
func (l *logLines) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, x := range l.lines {
		if strings.Contains(x, s) {
			n++
		}
	}
	return n
}

// wait returns the first line containing s that is at least the (n+1)th
// such line, waiting for it (an event, not a poll) up to d.
func (l *logLines) wait(tb testing.TB, s string, n int, d time.Duration) string {
	tb.Helper()
	timeout := time.After(d)
	for {
		l.mu.Lock()
		seen := 0
		for _, x := range l.lines {
			if strings.Contains(x, s) {
				if seen == n {
					l.mu.Unlock()
					return x
				}
				seen++
			}
		}
		ch, closed := l.changed, l.closed
		l.mu.Unlock()
		if closed {
			tb.Fatalf("bastiond exited before logging %q; log:\n%s", s, l)
		}
		select {
		case <-ch:
		case <-timeout:
			tb.Fatalf("bastiond did not log %q within %s; log:\n%s", s, d, l)
		}
	}
}

// startGateway writes cfg and starts bastiond --dev on it, returning once it
// is ready (it logged "gateway ready"). It is killed when the test ends.
func startGateway(tb testing.TB, cfg config.Config, writeConfig bool) *proc {
	tb.Helper()
	bin, _ := binaries(tb)
	return startGatewayBin(tb, bin, cfg, writeConfig)
}

// startGatewayBin is startGateway with the bastiond binary bin (the
// benchmark's baseline build).
func startGatewayBin(tb testing.TB, bin string, cfg config.Config, writeConfig bool) *proc {
	tb.Helper()
	if writeConfig {
		if err := gateway.WriteConfigFile(filepath.Join(cfg.StateDir, "bastion.yaml"), cfg); err != nil {
			tb.Fatal(err)
		}
	}
	argv := []string{bin, "--dev", "--state", cfg.StateDir}
	if w := os.Getenv("BENCH_BASTIOND_WRAP"); w != "" {
		argv = append([]string{w}, argv...)
	}
	cmd := child.DieWithTest(exec.Command(argv[0], argv[1:]...))
	if dir := os.Getenv("BENCH_PROFILE_DIR"); dir != "" {
		cmd.Env = append(os.Environ(), "BASTIOND_PROFILE_DIR="+dir)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start bastiond: %v", err)
	}
	p := &proc{cmd: cmd, log: newLogLines(), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.log.add(sc.Text())
		}
		p.log.close()
		cmd.Wait()
		close(p.done)
	}()
	tb.Cleanup(func() {
		p.kill()
		if tb.Failed() {
			tb.Logf("bastiond (pid %d) log:\n%s", cmd.Process.Pid, p.log)
		}
	})
	ready := "gateway ready"
	if cfg.Log.Level == "warn" || cfg.Log.Level == "error" {
		// Quiet logs (the benchmark): the start-up summary, printed just
		// before "gateway ready" once everything listens.
		ready = "Bastion dev is running"
	}
	p.log.wait(tb, ready, 0, 30*time.Second)
	return p
}

// kill SIGKILLs the process and waits until it is gone.
func (p *proc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop SIGTERMs the process and waits until it is gone.
func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.kill()
	}
}

// addDevice adds a device through the control socket: "cert" devices get a
// key and CSR of their own, "psk" devices a PSK.
func addDevice(tb testing.TB, state, name, auth string) *devicesim.Device {
	tb.Helper()
	req := gateway.AddRequest{Name: name, Auth: auth}
	var key []byte
	if auth == "cert" {
		k, csr, err := devicesim.NewKey()
		if err != nil {
			tb.Fatal(err)
		}
		key, req.CSR = k, string(csr)
	}
	var c gateway.Credentials
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := control.New(control.SocketPath(state)).Do(ctx, "POST", "/v1/devices", req, &c); err != nil {
		tb.Fatalf("add device %s: %v", name, err)
	}
	root, err := os.ReadFile(filepath.Join(state, "pki", "root.crt"))
	if err != nil {
		tb.Fatal(err)
	}
	return &devicesim.Device{Creds: devicesim.Creds{ID: c.ID, Name: name, Auth: c.Auth, PSKIdentity: c.PSKIdentity,
		PSK: c.PSK, CertPEM: c.CertPEM, CAPEM: string(root), KeyPEM: string(key)}}
}

// ctlStatus is the part of `bastionctl --json status` these tests read.
type ctlStatus struct {
	Components struct {
		Upstream struct {
			Link  upstream.Status `json:"link"`
			Queue struct {
				Depth int   `json:"depth"`
				Bytes int64 `json:"bytes"`
			} `json:"queue"`
		} `json:"upstream"`
	} `json:"components"`
}

// bastionctlStatus runs the real `bastionctl --json status` against state.
func bastionctlStatus(tb testing.TB, state string) ctlStatus {
	tb.Helper()
	_, ctl := binaries(tb)
	out, err := exec.Command(ctl, "--state", state, "--json", "status").Output()
	if err != nil {
		tb.Fatalf("bastionctl --json status: %v", err)
	}
	var st ctlStatus
	if err := json.Unmarshal(out, &st); err != nil {
		tb.Fatalf("bastionctl --json status printed %q: %v", out, err)
	}
	return st
}

func itoa(i int) string { return strconv.Itoa(i) }

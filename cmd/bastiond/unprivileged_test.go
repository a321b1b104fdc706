package main

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
	tnetns "github.com/bastion-iot/bastion/internal/testutil/netns"
)

// The appliance runs bastiond as an unprivileged user that holds only
// CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE (ambient, so the
// iptables it runs has them too), not as root. This runs the production
// configuration that way (uid 65534, the capabilities set by setpriv as
// systemd's AmbientCapabilities= does) in a network namespace the test
// makes, and checks that the firewall policy lands in that namespace's
// kernel tables; without the capabilities bastiond must refuse to start
// with a reason, rather than run with the box unfiltered.
func TestUnprivilegedFirewall(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ip")
	testenv.RequireCommand(t, "iptables")
	testenv.RequireCommand(t, "setpriv")
	const nobody = 65534

	ns := tnetns.New(t, "unpriv")
	ns.MustRun("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0-peer")
	ns.MustRun("ip", "link", "set", "lan0", "up")

	// Everything the unprivileged process needs is reachable by it: the
	// binary (this test binary, which doubles as bastiond) and the config
	// readable, the state directory its own.
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "bastiond")
	copyFile(t, os.Args[0], bin, 0o755)
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	cfg := config.Production()
	cfg.StateDir = state
	cfg.CoAP.Listen, cfg.CoAP.PSKListen, cfg.MQTT.Listen, cfg.Console.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Firmware.HTTPSListen = "127.0.0.1:0"
	cfg.Firewall.LAN = []string{"lan0"}
	// Not the host's input devices: a FIFO stands in for the button.
	cfg.Pairing.Input = filepath.Join(state, config.DevButtonFIFO)
	if err := syscall.Mkfifo(cfg.Pairing.Input, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(cfg.Pairing.Input, nobody, nobody); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "bastion.yaml")
	if err := gateway.WriteConfigFile(cfgPath, cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfgPath, 0o644); err != nil {
		t.Fatal(err)
	}

	caps := "+net_admin,+net_raw,+net_bind_service"
	run := func(withCaps bool) *exec.Cmd {
		// The user change clears the parent-death signal DieWithTest
		// sets; setpriv sets it again after the change.
		args := []string{"netns", "exec", ns.Name, "setpriv", "--reuid=" + strconv.Itoa(nobody), "--regid=" + strconv.Itoa(nobody), "--clear-groups", "--pdeathsig=KILL"}
		if withCaps {
			args = append(args, "--inh-caps="+caps, "--ambient-caps="+caps)
		}
		args = append(args, bin, "-test.run=^$", "--", "--config", cfgPath)
		cmd := child.DieWithTest(exec.Command("ip", args...))
		cmd.Env = append(os.Environ(), "BASTIOND_MAIN=1")
		return cmd
	}

	// Without the capabilities: refused, with the reason.
	out, err := run(false).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
		t.Fatalf("bastiond without CAP_NET_ADMIN: %v, want a failed start; output:\n%s", err, out)
	}
	if !strings.Contains(string(out), "lacks CAP_NET_ADMIN") {
		t.Errorf("bastiond without CAP_NET_ADMIN gave no reason naming it:\n%s", out)
	}
	if rules := ns.MustRun("iptables", "-S"); strings.Contains(rules, "bastion") {
		t.Fatalf("a refused start left rules behind:\n%s", rules)
	}

	// With them: runs as uid 65534 and applies the policy.
	cmd := run(true)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	ready := make(chan []string, 1)
	go func() {
		var seen []string
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			seen = append(seen, sc.Text())
			if strings.Contains(sc.Text(), "gateway ready") {
				ready <- seen
				io.Copy(io.Discard, stderr)
				return
			}
		}
		ready <- append(seen, "(bastiond's output ended)")
	}()
	select {
	case seen := <-ready:
		if !strings.Contains(strings.Join(seen, "\n"), "gateway ready") {
			t.Fatalf("bastiond as uid %d did not become ready:\n%s", nobody, strings.Join(seen, "\n"))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("bastiond as an unprivileged user not ready within 30 s")
	}
	// ip netns exec and setpriv exec in place: the pid is bastiond's.
	status, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "CapEff:\t0000000000003400"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("bastiond's /proc status lacks %q:\n%s", want, status)
		}
	}
	rules := ns.MustRun("iptables", "-S")
	for _, want := range []string{"-i lan0", "bastion:default-drop"} {
		if !strings.Contains(rules, want) {
			t.Errorf("the namespace's iptables lacks %q after bastiond started:\n%s", want, rules)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("bastiond exit after SIGTERM: %v, want status 0", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("bastiond did not exit within 20 s of SIGTERM")
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

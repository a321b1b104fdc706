package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

// The test binary doubles as bastiond: with BASTIOND_MAIN=1 it runs main
// with the arguments after "--".
func TestMain(m *testing.M) {
	if os.Getenv("BASTIOND_MAIN") == "1" {
		for i, a := range os.Args {
			if a == "--" {
				os.Args = append([]string{"bastiond"}, os.Args[i+1:]...)
				break
			}
		}
		main()
		return
	}
	os.Exit(m.Run())
}

func bastiond(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], append([]string{"-test.run=^$", "--"}, args...)...)
	cmd.Env = append(os.Environ(), "BASTIOND_MAIN=1")
	return child.DieWithTest(cmd)
}

// devState makes a --dev state directory in dir whose configuration
// listens on free loopback ports only.
func devState(t *testing.T, dir string) (state, cfgPath string) {
	t.Helper()
	state = filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	cfg := config.Dev(state)
	cfg.CoAP.Listen, cfg.CoAP.PSKListen, cfg.MQTT.Listen, cfg.Console.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfgPath = filepath.Join(state, "bastion.yaml")
	if err := gateway.WriteConfigFile(cfgPath, cfg); err != nil {
		t.Fatal(err)
	}
	return state, cfgPath
}

func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("firewall:\n  lan: [eth0]\nconsole:\n  listen: \":99999\"\n"), 0o600)
	out, err := bastiond("--check-config", bad).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("bad config: exit %v, want 1", err)
	}
	if want := bad + ":4: console.listen: \":99999\""; !strings.Contains(string(out), want) {
		t.Errorf("output %q does not contain %q", out, want)
	}
	good := filepath.Join(dir, "good.yaml")
	if out, err := bastiond("--write-default-config", good).CombinedOutput(); err != nil {
		t.Fatalf("write default config: %v %s", err, out)
	}
	out, err = bastiond("--check-config", good).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "configuration OK") {
		t.Errorf("default config: %v %s", err, out)
	}
	out, err = bastiond("--check-config", filepath.Join(dir, "missing.yaml")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.yaml") {
		t.Errorf("missing config: %v %s", err, out)
	}
}

// bastiond --dev starts within 5 s, reloads on SIGHUP (keeping the old
// configuration when the new one is bad), and exits 0 on SIGTERM, also
// while a console client holds a connection past the shutdown deadline.
func TestDevSignals(t *testing.T) {
	state, cfgPath := devState(t, t.TempDir())
	cmd := bastiond("--dev", "--state", state)
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waitFor := func(what string, d time.Duration) []string {
		t.Helper()
		var seen []string
		timeout := time.After(d)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("bastiond exited before %q; output:\n%s", what, strings.Join(seen, "\n"))
				}
				seen = append(seen, l)
				if strings.Contains(l, what) {
					return seen
				}
			case <-timeout:
				t.Fatalf("no %q within %s; output:\n%s", what, d, strings.Join(seen, "\n"))
			}
		}
	}
	out := strings.Join(waitFor("gateway ready", 5*time.Second), "\n")
	for _, w := range []string{"coaps://127.0.0.1:", "mqtts://127.0.0.1:", "https://127.0.0.1:", "setup code: "} {
		if !strings.Contains(out, w) {
			t.Errorf("start-up output lacks %q", w)
		}
	}
	// The appliance's console banner finds the setup code by this whole
	// line and nothing else (images/rootfs/usr/lib/bastion/setup-code).
	if !regexp.MustCompile(`(?m)^  setup code: [A-Z2-7]{4}(-[A-Z2-7]{4}){3}   \(one-time: creates the first console admin\)$`).MatchString(out) {
		t.Errorf("start-up output has no setup code line in the form images/rootfs/usr/lib/bastion/setup-code reads:\n%s", out)
	}
	consoleAddr := regexp.MustCompile(`console: +https://(127\.0\.0\.1:[0-9]+)/`).FindStringSubmatch(out)
	if consoleAddr == nil {
		t.Fatalf("start-up output names no console address:\n%s", out)
	}
	ctx := context.Background()
	if _, err := control.New(control.SocketPath(state)).Do(ctx, "GET", "/v1/status", nil, nil); err != nil {
		t.Fatalf("control socket: %v", err)
	}

	good, _ := os.ReadFile(cfgPath)
	os.WriteFile(cfgPath, []byte("log:\n  level: shouty\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor("config reload refused", 5*time.Second)
	if _, err := control.New(control.SocketPath(state)).Do(ctx, "GET", "/v1/status", nil, nil); err != nil {
		t.Fatalf("bastiond not serving after a refused reload: %v", err)
	}
	os.WriteFile(cfgPath, good, 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor("config reloaded", 5*time.Second)

	// A console client that has sent a form's headers but not its body
	// holds its connection active until the server's read timeout (30 s),
	// past the console's 5 s shutdown deadline: the stop must still be clean.
	// The "100 Continue" the server sends when the handler starts reading
	// the body shows the request is in (a SIGTERM before that would make
	// the server drop it unread).
	roots := x509.NewCertPool()
	if pem, err := os.ReadFile(filepath.Join(state, "pki", "root.crt")); err != nil || !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("gateway root CA: %v", err)
	}
	held, err := tls.Dial("tcp", consoleAddr[1], &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("console: %v", err)
	}
	defer held.Close()
	if _, err := held.Write([]byte("POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n" +
		"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n")); err != nil {
		t.Fatalf("console: %v", err)
	}
	held.SetReadDeadline(time.Now().Add(10 * time.Second))
	if status, err := bufio.NewReader(held).ReadString('\n'); err != nil || !strings.HasPrefix(status, "HTTP/1.1 100 ") {
		t.Fatalf("console POST /login with Expect: 100-continue: %q, %v; want 100 Continue", status, err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	var last []string // read before done is sent
	go func() {
		for l := range lines {
			last = append(last, l)
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("bastiond exit after SIGTERM: %v, want status 0; output after SIGTERM:\n%s", err, strings.Join(last, "\n"))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("bastiond did not exit within 20s of SIGTERM")
	}
	if _, err := os.Stat(control.SocketPath(state)); err == nil {
		t.Error("control socket left behind after a clean stop")
	}
}

// TestBastiondEndsWithTestBinary: a test binary killed before its cleanups
// run (a -timeout panic, SIGKILL) leaves no bastiond it started behind.
func TestBastiondEndsWithTestBinary(t *testing.T) {
	const helperEnv = "BASTIOND_TEST_HELPER"
	if os.Getenv(helperEnv+"_DIR") != "" {
		state, _ := devState(t, os.Getenv(helperEnv+"_DIR"))
		cmd := bastiond("--dev", "--state", state)
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			fmt.Println("start bastiond:", err)
			os.Exit(1)
		}
		// Running, not failing on its own: a bastiond that exits by itself
		// would pass the check below for the wrong reason.
		var seen []string
		for sc := bufio.NewScanner(stderr); ; {
			if !sc.Scan() {
				fmt.Printf("bastiond exited before it was ready: %q\n", seen)
				os.Exit(1)
			}
			if seen = append(seen, sc.Text()); strings.Contains(sc.Text(), "gateway ready") {
				break
			}
		}
		go io.Copy(io.Discard, stderr)
		fmt.Println(cmd.Process.Pid)
		// Killed here by the test; stdin never ends before that.
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(1)
	}
	child.CheckEndsWithParent(t, func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestBastiondEndsWithTestBinary$", "-test.count=1")
		// The killed test's state directory goes with this test's files
		// (and its control socket's path stays short enough to bind).
		cmd.Env = append(os.Environ(), helperEnv+"_DIR="+t.TempDir())
		return cmd
	})
}

package main

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
)

// TestDevStateDefault: `bastiond --dev` without --state keeps its state in
// ./bastion-dev, the directory the README's walk-through and devicesim's
// --fifo example name. The test puts a configuration on free ports there
// first, so a bastiond that looked elsewhere would say another state
// directory (and not start on these ports).
func TestDevStateDefault(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "bastion-dev")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := config.Dev(state)
	cfg.CoAP.Listen, cfg.CoAP.PSKListen, cfg.MQTT.Listen, cfg.Console.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	if err := gateway.WriteConfigFile(filepath.Join(state, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}

	cmd := bastiond("--dev")
	cmd.Dir = dir
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		for sc := bufio.NewScanner(stderr); sc.Scan(); {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var seen []string
	timeout := time.After(10 * time.Second)
	for ready := false; !ready; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("bastiond --dev exited before it was ready:\n%s", strings.Join(seen, "\n"))
			}
			seen = append(seen, l)
			ready = strings.Contains(l, "gateway ready")
		case <-timeout:
			t.Fatalf("bastiond --dev not ready within 10s:\n%s", strings.Join(seen, "\n"))
		}
	}
	if want := "state:    " + state; !strings.Contains(strings.Join(seen, "\n"), want) {
		t.Errorf("start-up output lacks %q:\n%s", want, strings.Join(seen, "\n"))
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() {
		for range lines {
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("bastiond exit after SIGTERM: %v, want status 0", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("bastiond did not exit within 20s of SIGTERM")
	}
}

// Package mosquitto runs a real Debian Mosquitto 2 broker for tests: TLS 1.3
// only (or, by option, TLS 1.2 only), client certificates required
// (require_certificate true, use_identity_as_username true), on a free
// 127.0.0.1 port, with a test CA in the test's temporary directory. A test can stop it and start it again on
// the same port to simulate an outage. Readiness is proven by completing a
// TLS handshake, never by sleeping. It never listens beyond loopback and never
// runs without TLS.
package mosquitto

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// ServerName is the DNS name in the broker's certificate.
const ServerName = "mosquitto.test"

// Options changes how the broker is set up.
type Options struct {
	// CA issues the broker's certificate and is the CA it trusts for
	// clients. Nil makes a fresh one.
	CA *testpki.CA
	// Config is appended to the generated mosquitto.conf (an ACL, a bridge).
	Config string
	// Name distinguishes several brokers in one test (files, logs).
	Name string
	// Persistent keeps sessions and queued messages across Stop/Start
	// (mosquitto persistence in the broker's directory).
	Persistent bool
	// TLSVersion is the one TLS version the broker speaks: "1.3" (the
	// default, "") or "1.2", a broker that predates TLS 1.3 or has it
	// turned off.
	TLSVersion string
}

// Broker is a running (or stopped) mosquitto process.
type Broker struct {
	// Addr is host:port of the TLS listener.
	Addr string
	Port int
	// CA signed the server certificate and is trusted for client certificates.
	CA     *testpki.CA
	Server *testpki.Leaf
	// Dir holds the config, certificates and the log file.
	Dir     string
	LogFile string

	t      testing.TB
	bin    string
	conf   string
	env    []string // the broker process's environment (nil: ours)
	tlsMin uint16   // what ClientTLS offers at least
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	// probe is the client certificate used for readiness handshakes.
	probe *testpki.Leaf
}

// Start starts mosquitto on a free loopback port and waits until it
// completes TLS handshakes. It is stopped when the test ends.
func Start(t testing.TB, o Options) *Broker {
	t.Helper()
	bin := testenv.RequireCommand(t, "mosquitto")
	name := o.Name
	if name == "" {
		name = "mosquitto"
	}
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("mosquitto: mkdir %s: %v", dir, err)
	}
	ca := o.CA
	if ca == nil {
		ca = testpki.New(t, dir, "test")
	}
	b := &Broker{
		CA:      ca,
		Server:  ca.Server(t, name+"-server", ServerName, "127.0.0.1"),
		Dir:     dir,
		LogFile: filepath.Join(dir, "mosquitto.log"),
		t:       t,
		bin:     bin,
		conf:    filepath.Join(dir, "mosquitto.conf"),
	}
	b.probe = ca.Client(t, name+"-probe")
	tlsConf := "tls_version tlsv1.3\n"
	b.tlsMin = tls.VersionTLS13
	switch o.TLSVersion {
	case "", "1.3":
	case "1.2":
		// Mosquitto 2.0 reads tls_version as the lowest version it
		// accepts and would still negotiate TLS 1.3; only OpenSSL's own
		// configuration caps the highest one.
		tlsConf = "tls_version tlsv1.2\n"
		b.tlsMin = tls.VersionTLS12
		osslConf := filepath.Join(dir, "openssl.cnf")
		if err := os.WriteFile(osslConf, []byte(tls12Only), 0o644); err != nil {
			t.Fatalf("mosquitto: write %s: %v", osslConf, err)
		}
		b.env = append(os.Environ(), "OPENSSL_CONF="+osslConf)
	default:
		t.Fatalf("mosquitto: Options.TLSVersion %q: want \"1.3\" (or empty) or \"1.2\"", o.TLSVersion)
	}
	// Another process could take the port before mosquitto binds; Start
	// then fails loudly rather than hangs.
	b.Port = testenv.FreePort(t, "tcp")
	b.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(b.Port))

	var c strings.Builder
	fmt.Fprintf(&c, "per_listener_settings false\n")
	if os.Geteuid() == 0 {
		// As root mosquitto would switch to the mosquitto user, which
		// cannot enter the test's private temporary directory.
		fmt.Fprintf(&c, "user root\n")
	}
	if o.Persistent {
		fmt.Fprintf(&c, "persistence true\npersistence_location %s/\n", dir)
	} else {
		fmt.Fprintf(&c, "persistence false\n")
	}
	fmt.Fprintf(&c, "log_dest file %s\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n", b.LogFile)
	// Unlimited queues: a test that counts messages must not lose any to a
	// broker-side limit it did not ask for.
	fmt.Fprintf(&c, "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 100\n")
	fmt.Fprintf(&c, "allow_anonymous false\n")
	fmt.Fprintf(&c, "listener %d 127.0.0.1\n", b.Port)
	fmt.Fprintf(&c, "cafile %s\ncertfile %s\nkeyfile %s\n", ca.CertFile, b.Server.CertFile, b.Server.KeyFile)
	fmt.Fprintf(&c, "require_certificate true\nuse_identity_as_username true\n%s", tlsConf)
	c.WriteString(o.Config)
	c.WriteString("\n")
	if err := os.WriteFile(b.conf, []byte(c.String()), 0o644); err != nil {
		t.Fatalf("mosquitto: write config: %v", err)
	}
	t.Cleanup(func() { b.stop() })
	b.Start(t)
	return b
}

// tls12Only is an OpenSSL configuration (OPENSSL_CONF) whose defaults for
// every TLS context cap the protocol at TLS 1.2.
const tls12Only = `openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MaxProtocol = TLSv1.2
`

// Start starts the broker again (after Stop) on the same port and waits for
// it to complete a TLS handshake.
func (b *Broker) Start(t testing.TB) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd != nil {
		t.Fatalf("mosquitto: Start while running")
	}
	// Not left running if the test binary dies without its cleanups.
	cmd := child.DieWithTest(exec.Command(b.bin, "-c", b.conf))
	cmd.Env = b.env
	out, err := os.OpenFile(filepath.Join(b.Dir, "stderr.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("mosquitto: open stderr log: %v", err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("mosquitto: start %s: %v", b.bin, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	b.cmd, b.done = cmd, done

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	tc := b.ClientTLS(b.probe)
	var last error
	for {
		d := tls.Dialer{Config: tc, NetDialer: &net.Dialer{Timeout: time.Second}}
		conn, err := d.DialContext(ctx, "tcp", b.Addr)
		if err == nil {
			conn.Close()
			return
		}
		last = err
		select {
		case <-done:
			b.cmd = nil
			t.Fatalf("mosquitto exited during start-up (%v); log:\n%s\n%s", last, b.readLog("stderr.log"), b.Log())
		case <-ctx.Done():
			t.Fatalf("mosquitto not ready on %s after 15s: %v; log:\n%s", b.Addr, last, b.Log())
		case <-time.After(20 * time.Millisecond): // between handshake attempts
		}
	}
}

// Stop stops the broker (SIGTERM) and waits until the process has exited.
func (b *Broker) Stop(t testing.TB) {
	t.Helper()
	if err := b.stop(); err != nil {
		t.Fatalf("mosquitto: stop: %v", err)
	}
}

// Pid is the broker process's id (0 while stopped), for benchmarks that
// read its CPU time.
func (b *Broker) Pid() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return 0
	}
	return b.cmd.Process.Pid
}

func (b *Broker) stop() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cmd == nil {
		return nil
	}
	cmd, done := b.cmd, b.done
	b.cmd = nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
		return nil
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		return errors.New("mosquitto did not exit within 10s of SIGTERM; killed")
	}
}

// ClientTLS is a client configuration presenting leaf and trusting the
// broker's CA, for test publishers and subscribers: TLS 1.3, or TLS 1.2 and
// up for a broker started with TLSVersion "1.2".
func (b *Broker) ClientTLS(leaf *testpki.Leaf) *tls.Config {
	return &tls.Config{
		MinVersion:   b.tlsMin,
		RootCAs:      b.CA.Pool(),
		ServerName:   ServerName,
		Certificates: []tls.Certificate{leaf.TLS},
	}
}

// Log returns the broker's log so far.
func (b *Broker) Log() string { return b.readLog("mosquitto.log") }

func (b *Broker) readLog(name string) string {
	s, err := os.ReadFile(filepath.Join(b.Dir, name))
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return string(s)
}

package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
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

	"github.com/bastion-iot/bastion/gateway"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/control"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

var (
	buildOnce sync.Once
	bastiond  string
	buildErr  error
)

// buildBastiond builds the daemon once per run: Bastion is measured as its
// own process, as Mosquitto and libcoap are.
func buildBastiond(b *testing.B) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "bastion-bench-bin")
		if err != nil {
			buildErr = err
			return
		}
		bastiond = filepath.Join(dir, "bastiond")
		args := []string{"build", "-o", bastiond}
		if os.Getenv("BENCH_PROFILE_DIR") != "" {
			// SIGUSR1 writes heap/goroutine profiles (cmd/bastiond/profile_benchprof.go).
			args = append(args, "-tags", "benchprof")
		}
		out, err := exec.Command("go", append(args, "github.com/bastion-iot/bastion/cmd/bastiond")...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build bastiond: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		b.Fatal(buildErr)
	}
	return bastiond
}

func raiseNoFile(b *testing.B, n uint64) {
	var r syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r)
	if r.Cur >= n {
		return
	}
	// Raising the hard limit needs CAP_SYS_RESOURCE; take what is allowed.
	r.Cur = min(n, r.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		b.Fatalf("ulimit -n %d: %v", r.Cur, err)
	}
}

type bastion struct {
	cmd   *exec.Cmd
	dir   string
	ctl   *control.Client
	addrs map[string]string
	root  string // CA PEM
}

// startBastion runs bastiond --dev on free loopback ports with logs at warn.
func startBastion(b *testing.B) *bastion {
	return startBastionBin(b, buildBastiond(b))
}

// startBastionBin is startBastion with the bastiond binary bin (a
// baseline build, BENCH_BASTIOND_BASELINE) and env added to its
// environment.
func startBastionBin(b *testing.B, bin string, env ...string) *bastion {
	dir := b.TempDir()
	cfg := config.Dev(dir)
	cfg.CoAP.Listen, cfg.CoAP.PSKListen, cfg.MQTT.Listen = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.Console.Enabled = false
	cfg.Log.Level = "warn"
	if l := os.Getenv("BENCH_LOG_LEVEL"); l != "" {
		cfg.Log.Level = l
	}
	if err := gateway.WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		b.Fatal(err)
	}
	cmd := child.DieWithTest(exec.Command(bin, "--dev", "--state", dir))
	// BENCH_BASTIOND_GOMEMLIMIT sets a Go soft memory limit for bastiond
	// only (not for the load generator in this process).
	cmd.Env = os.Environ()
	if v := os.Getenv("BENCH_BASTIOND_GOMEMLIMIT"); v != "" {
		cmd.Env = append(cmd.Env, "GOMEMLIMIT="+v)
	}
	// BENCH_BASTIOND_GOMAXPROCS sets GOMAXPROCS for bastiond only.
	if v := os.Getenv("BENCH_BASTIOND_GOMAXPROCS"); v != "" {
		cmd.Env = append(cmd.Env, "GOMAXPROCS="+v)
	}
	if v := os.Getenv("BENCH_PROFILE_DIR"); v != "" {
		cmd.Env = append(cmd.Env, "BASTIOND_PROFILE_DIR="+v)
		// BENCH_MEMPROFILE_RATE=1: exact heap profile (slow; for IdleRSS).
		if r := os.Getenv("BENCH_MEMPROFILE_RATE"); r != "" {
			cmd.Env = append(cmd.Env, "BASTIOND_MEMPROFILE_RATE="+r)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var errBuf bytes.Buffer
	cmd.Stderr, cmd.Stdout = &errBuf, &errBuf
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	bs := &bastion{cmd: cmd, dir: dir, ctl: control.New(control.SocketPath(dir))}
	b.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if b.Failed() || os.Getenv("BENCH_LOG") != "" {
			b.Logf("bastiond output:\n%s", errBuf.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st gateway.Status
		_, err := bs.ctl.Do(context.Background(), "GET", "/v1/status", nil, &st)
		if err == nil && st.Listeners["mqtts"] != "" {
			bs.addrs = st.Listeners
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("bastiond not up within 30s: %v\n%s", err, errBuf.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	root, err := os.ReadFile(filepath.Join(dir, "pki", "root.crt"))
	if err != nil {
		b.Fatal(err)
	}
	bs.root = string(root)
	return bs
}

// addDevices adds n devices with auth psk or cert (with parallel requests).
func (bs *bastion) addDevices(b *testing.B, prefix, auth string, n int) []*devicesim.Device {
	out := make([]*devicesim.Device, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var mu sync.Mutex
	var firstErr error
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			req := gateway.AddRequest{Name: fmt.Sprintf("%s-%d", prefix, i), Auth: auth}
			var key []byte
			if auth == "cert" {
				k, csr, err := devicesim.NewKey()
				if err != nil {
					panic(err)
				}
				key, req.CSR = k, string(csr)
			}
			var c gateway.Credentials
			if _, err := bs.ctl.Do(context.Background(), "POST", "/v1/devices", req, &c); err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
				return
			}
			out[i] = &devicesim.Device{Creds: devicesim.Creds{ID: c.ID, Auth: c.Auth, PSKIdentity: c.PSKIdentity,
				PSK: c.PSK, CoAPSPort: c.CoAPSPort, CertPEM: c.CertPEM, CAPEM: bs.root, KeyPEM: string(key)}}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		b.Fatalf("add devices: %v", firstErr)
	}
	return out
}

// rss returns the resident set size of pid in bytes.
func rss(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// testCA is a throwaway CA for the peers (Mosquitto), configured the way
// Bastion is: ECDSA P-256, client certificates required.
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	pem  string
}

func newTestCA(b *testing.B) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	t := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, t, t, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: c, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
}

var serial int64 = 10

func (ca *testCA) issue(b *testing.B, cn string, server bool) (certPEM, keyPEM string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial++
	t := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	if server {
		t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	} else {
		t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, t, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		b.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
}

// startMosquitto runs Mosquitto 2 with TLS and require_certificate, as
// Bastion's MQTT listener is configured. tls_version is Mosquitto 2's
// minimum (TLS 1.3 is negotiated, as with Bastion); without ciphers_tls1.3
// OpenSSL picks TLS_AES_256_GCM_SHA384 where Go picks AES-128-GCM, so the
// suite is pinned to the one Bastion uses (BenchmarkMQTTvsMosquitto checks
// both sides negotiate the same).
func startMosquitto(b *testing.B, ca *testCA) (addr string, pid int) {
	bin := testenv.RequireCommand(b, "mosquitto")
	dir := b.TempDir()
	sc, sk := ca.issue(b, "127.0.0.1", true)
	os.WriteFile(filepath.Join(dir, "ca.pem"), []byte(ca.pem), 0o600)
	os.WriteFile(filepath.Join(dir, "srv.pem"), []byte(sc), 0o600)
	os.WriteFile(filepath.Join(dir, "srv.key"), []byte(sk), 0o600)
	port := testenv.FreePort(b, "tcp")
	conf := fmt.Sprintf(`listener %d 127.0.0.1
cafile %s/ca.pem
certfile %s/srv.pem
keyfile %s/srv.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
ciphers_tls1.3 TLS_AES_128_GCM_SHA256
allow_anonymous false
persistence false
log_dest stderr
log_type error
user root
max_inflight_messages 64
max_packet_size 65536
`, port, dir, dir, dir)
	os.WriteFile(filepath.Join(dir, "m.conf"), []byte(conf), 0o600)
	cmd := child.DieWithTest(exec.Command(bin, "-c", filepath.Join(dir, "m.conf")))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	addr = fmt.Sprintf("127.0.0.1:%d", port)
	waitTCP(b, addr, &out)
	return addr, cmd.Process.Pid
}

// cpuTime returns the CPU time all threads of pid have run so far
// (/proc/PID/task/*/schedstat, nanoseconds). CPU per message is what a
// shared machine disturbs least: other jobs stretch a run's wall time, not
// the cycles the broker spends on it.
func cpuTime(pid int) time.Duration {
	ns, _ := testenv.SchedStat(pid)
	return time.Duration(ns)
}

func waitTCP(b *testing.B, addr string, out *bytes.Buffer) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s not listening within 10s: %v\n%s", addr, err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMain removes the bastiond built for the run: each run's copy is
// about 25 MiB, and hundreds of runs had filled /tmp.
func TestMain(m *testing.M) {
	code := m.Run()
	if bastiond != "" {
		os.RemoveAll(filepath.Dir(bastiond))
	}
	os.Exit(code)
}

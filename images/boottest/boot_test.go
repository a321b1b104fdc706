package boottest

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pion/dtls/v3"
	"go.uber.org/goleak"

	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The gateway's own ports (guest side) and the ports that must stay silent.
var (
	gatewayTCP = []int{443, 8883}
	gatewayUDP = []int{5684, 5685}
	// A bounded set of ports that services commonly leave open, plus the
	// cleartext twins of the gateway's protocols.
	silentTCP = []int{21, 22, 23, 25, 53, 80, 110, 111, 135, 139, 445, 1883, 2323, 3000, 5000,
		5432, 6379, 8000, 8080, 8081, 8443, 9000, 9090, 9100, 10000}
	silentUDP = []int{53, 123, 161, 1900, 5353, 5355, 5683}
)

// Capabilities bastiond may hold: CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN
// (12), CAP_NET_RAW (13).
// guestIP is the address qemu's user-mode DHCP gives the guest.
const guestIP = "10.0.2.15"

const wantCapBnd = 1<<10 | 1<<12 | 1<<13

func TestApplianceBoot(t *testing.T) {
	imageDir := os.Getenv("BASTION_IMAGE_DIR")
	if imageDir == "" {
		// Not testenv.missing: this suite is run by scripts/test.d/image.sh,
		// which builds the image first and sets the variable.
		t.Skip("BASTION_IMAGE_DIR is not set: run scripts/test.d/image.sh (builds the image, then boots it)")
	}
	testenv.RequireRoot(t) // debugfs on a root-owned image, as build.sh made it
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()

	l, err := readLayout(imageDir)
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	devicesim := buildDevicesim(t, work)
	keyFile, csrFile := filepath.Join(work, "device.key"), filepath.Join(work, "device.csr")
	if out, err := exec.Command(devicesim, "keygen", keyFile, csrFile).CombinedOutput(); err != nil {
		t.Fatalf("devicesim keygen: %v: %s", err, out)
	}
	buttonTest := filepath.Join(work, "button.test")
	build := exec.Command("go", "test", "-c", "-o", buttonTest, "github.com/bastion-iot/bastion/gateway/button")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go test -c gateway/button: %v: %s", err, out)
	}
	disk := makeTestDisk(t, imageDir, l, map[string]string{"device.csr": csrFile, "button.test": buttonTest})
	ns := newNetns(t)

	var fwds []forward
	hostPort := map[string]int{}
	// A port freed by one pick can be handed out again by the next, and
	// qemu refuses to start when two forwards share a host port; CI saw it.
	taken := map[string]bool{}
	pick := func(proto string) int {
		for range 100 {
			hp, err := ns.freePort(proto)
			if err != nil {
				t.Fatal(err)
			}
			if k := fmt.Sprintf("%s/%d", proto, hp); !taken[k] {
				taken[k] = true
				return hp
			}
		}
		t.Fatalf("no unused %s port after 100 picks", proto)
		return 0
	}
	add := func(proto string, ports []int) {
		for _, p := range ports {
			f := forward{proto: proto, guest: p, host: pick(proto)}
			fwds = append(fwds, f)
			hostPort[f.String()] = f.host
		}
	}
	add("tcp", gatewayTCP)
	add("udp", gatewayUDP)
	// MQTT again on the guest's address inside the namespace: devicesim
	// checks the gateway's certificate for the host it dials, and the
	// certificate names the LAN address, as it does for real devices.
	mqttByName := pick("tcp")
	fwds = append(fwds, forward{proto: "tcp", guest: 8883, host: mqttByName, bind: guestIP})
	add("tcp", silentTCP)
	add("udp", silentUDP)

	start := time.Now()
	v := startVM(ctx, t, ns, imageDir, disk, fwds, "systemd.journald.forward_to_console=1")

	// 1. The product's console banner: ready, where the console is, and
	// (first boot) the setup code.
	bootCtx, bootCancel := context.WithTimeout(ctx, 8*time.Minute)
	defer bootCancel()
	if _, err := v.console.waitFor(bootCtx, regexp.MustCompile(`Bastion gateway ready`)); err != nil {
		t.Fatalf("gateway never became ready: %v", err)
	}
	t.Logf("banner after %s (wall clock, TCG)", time.Since(start).Round(time.Second))
	if _, err := v.console.waitFor(bootCtx, regexp.MustCompile(`Console: https://10\.0\.2\.15/`)); err != nil {
		t.Errorf("banner does not show the console address: %v", err)
	}
	bannerCodeRE := regexp.MustCompile(`First-admin setup code: *(\S+)`)
	shownCode := ""
	if line, err := v.console.waitFor(bootCtx, bannerCodeRE); err != nil {
		t.Errorf("first boot did not show the setup code on the console: %v", err)
	} else {
		shownCode = bannerCodeRE.FindStringSubmatch(line)[1]
	}
	if _, err := v.report.waitFor(bootCtx, regexp.MustCompile(`^=== REPORT DONE$`)); err != nil {
		t.Fatalf("test report did not complete: %v", err)
	}
	t.Logf("report after %s", time.Since(start).Round(time.Second))
	rep, err := parseReport(v.report.lines())
	if err != nil {
		t.Fatal(err)
	}

	checkInside(t, rep)
	// The code on the screen is the one bastiond made: its start-up
	// summary line in the journal.
	if m := regexp.MustCompile(`(?m)^  setup code: (\S+)   \(one-time`).FindStringSubmatch(rep["bastiond-log"].body); m == nil {
		t.Errorf("no setup code in bastiond's journal:\n%s", rep["bastiond-log"].body)
	} else if shownCode != "" && shownCode != m[1] {
		t.Errorf("the banner shows setup code %q, bastiond made %q", shownCode, m[1])
	}

	// The pairing button on the appliance: Scroll Lock held 1.5 s on the
	// box's keyboard (bastiond finds it by itself: pairing.input auto) opens
	// a window, which the screen shows (bastion-screen.service; the
	// "Bastion: " lines are its own, not the journal this test VM also
	// forwards to the console).
	if err := v.holdKey(ctx, "scroll_lock", 1500*time.Millisecond); err != nil {
		t.Fatalf("press the pairing key: %v", err)
	}
	keyCtx, keyCancel := context.WithTimeout(ctx, 30*time.Second)
	defer keyCancel()
	if _, err := v.console.waitFor(keyCtx, regexp.MustCompile(`Bastion: pairing window opened`)); err != nil {
		t.Errorf("holding the pairing key on the appliance's keyboard opened no window: %v\nconsole tail:\n%s", err, v.console.tail(40))
	}
	// Held 10 s or more it cancels the window; with no window open, it
	// shows a one-time console password recovery code on the screen, the
	// appliance's only way back into a console whose password is lost.
	if err := v.holdKey(ctx, "scroll_lock", 11*time.Second); err != nil {
		t.Fatalf("hold the pairing key: %v", err)
	}
	if _, err := v.console.waitFor(keyCtx, regexp.MustCompile(`Bastion: pairing window closed`)); err != nil {
		t.Errorf("a long hold did not close the window: %v\nconsole tail:\n%s", err, v.console.tail(40))
	}
	if err := v.holdKey(ctx, "scroll_lock", 11*time.Second); err != nil {
		t.Fatalf("hold the pairing key: %v", err)
	}
	recCtx, recCancel := context.WithTimeout(ctx, 30*time.Second)
	defer recCancel()
	codeRE := regexp.MustCompile(`Bastion: console recovery code: (\S+)`)
	line, err := v.console.waitFor(recCtx, codeRE)
	if err != nil {
		t.Fatalf("a long hold with no window open showed no recovery code: %v\nconsole tail:\n%s", err, v.console.tail(40))
	}
	code := codeRE.FindStringSubmatch(line)[1]

	// 2. From the outside, through the forwarded ports.
	roots := x509.NewCertPool()
	if s := rep["root-crt"]; s.rc != 0 || !roots.AppendCertsFromPEM([]byte(s.body)) {
		t.Fatalf("no CA root certificate in the report (rc %d):\n%s", s.rc, s.body)
	}
	// The recovery code from the screen sets a console password, once.
	consoleAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort[forward{proto: "tcp", guest: 443}.String()]))
	if err := recoverConsole(ctx, ns, consoleAddr, roots, code); err != nil {
		t.Errorf("console password recovery with the code from the screen: %v", err)
	}
	for _, p := range gatewayTCP {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort[forward{proto: "tcp", guest: p}.String()]))
		if err := tlsChainCheck(ctx, ns, addr, roots); err != nil {
			t.Errorf("tcp/%d: %v", p, err)
		}
	}
	var psk struct {
		ID          string `json:"id"`
		PSKIdentity string `json:"psk_identity"`
		PSK         string `json:"psk"`
		CoAPSPort   int    `json:"coaps_port"`
	}
	if s := rep["device-psk"]; s.rc != 0 || json.Unmarshal([]byte(s.body), &psk) != nil || psk.PSK == "" {
		t.Errorf("bastionctl device add --auth psk failed in the guest (rc %d):\n%s", s.rc, s.body)
	} else {
		port := psk.CoAPSPort
		if port == 0 {
			port = 5685
		}
		addr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: hostPort[forward{proto: "udp", guest: port}.String()]}
		if err := dtlsPSKHandshake(ctx, ns, addr, psk.PSKIdentity, psk.PSK); err != nil {
			t.Errorf("CoAPS PSK handshake on udp/%d: %v", port, err)
		}
	}
	// The certificate CoAPS port must at least answer a DTLS ClientHello.
	if n, err := dtlsAnswers(ctx, ns, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: hostPort["udp/5684"]}, roots); n == 0 {
		t.Errorf("udp/5684 (CoAPS, certificates) sent no DTLS record back: %v", err)
	}
	checkSilent(ctx, t, ns, hostPort)

	// Devices publish through the box with devicesim: CoAPS with the PSK
	// device, MQTT over TLS with a certificate device enrolled from a CSR.
	if s := rep["device-psk"]; s.rc == 0 {
		creds := filepath.Join(work, "psk.json")
		os.WriteFile(creds, []byte(s.body), 0o600)
		port := hostPort[forward{proto: "udp", guest: 5685}.String()]
		if psk.CoAPSPort != 0 {
			port = hostPort[forward{proto: "udp", guest: psk.CoAPSPort}.String()]
		}
		runDevicesim(ctx, t, ns, devicesim, "--coap", "--creds", creds, "--addr", fmt.Sprintf("127.0.0.1:%d", port),
			"--count", "3", "publish", "boot/temp", "21.5")
	}
	if s := rep["device-cert"]; s.rc != 0 {
		t.Errorf("bastionctl device add --auth cert --csr failed in the guest (rc %d):\n%s", s.rc, s.body)
	} else {
		creds := filepath.Join(work, "cert.json")
		os.WriteFile(creds, []byte(s.body), 0o600)
		runDevicesim(ctx, t, ns, devicesim, "--mqtt", "--creds", creds, "--key", keyFile,
			"--addr", fmt.Sprintf("%s:%d", guestIP, mqttByName), "--count", "3", "publish", "boot/temp", "21.5")
	}

	// 3. Power button: the box shuts down cleanly.
	offCtx, offCancel := context.WithTimeout(ctx, 2*time.Minute)
	defer offCancel()
	if err := v.powerOff(offCtx); err != nil {
		t.Fatalf("power off: %v", err)
	}
	if _, err := v.console.waitFor(offCtx, regexp.MustCompile(`reboot: Power down`)); err != nil {
		t.Errorf("no clean power down on the console: %v", err)
	}
	t.Logf("whole boot test %s", time.Since(start).Round(time.Second))
}

// checkInside judges what the report unit saw inside the guest.
func checkInside(t *testing.T, rep map[string]section) {
	t.Helper()
	for _, name := range []string{"iptables", "ip6tables", "sockets", "mounts", "sysctl", "bastiond-status", "failed-units", "root-password", "button-uinput"} {
		if s, ok := rep[name]; !ok || s.rc != 0 {
			t.Errorf("report section %s missing or failed (rc %d):\n%s", name, s.rc, s.body)
		}
	}
	// The pairing button through a real kernel input device (uinput on the
	// appliance's kernel): it must have run, not skipped.
	if b := rep["button-uinput"].body; !strings.Contains(b, "--- PASS: TestRealInputDevice") || !strings.Contains(b, "--- PASS: TestRealAutoInput") {
		t.Errorf("TestRealInputDevice did not pass inside the appliance:\n%s", b)
	} else {
		t.Logf("inside the appliance:\n%s", b)
	}

	// Firewall: inbound denied by default, the gateway's ports opened on
	// the lan interface only, nothing for the cleartext twins or SSH/HTTP.
	for _, fam := range []string{"iptables", "ip6tables"} {
		if err := checkDefaultDeny(rep[fam].body); err != nil {
			t.Errorf("%s: %v:\n%s", fam, err, rep[fam].body)
		}
		rules := rep[fam].body
		for _, p := range []string{"tcp 443", "tcp 8883", "udp 5684", "udp 5685"} {
			proto, port, _ := strings.Cut(p, " ")
			re := regexp.MustCompile(`(?m)^-A \S+ -i eth0 -p ` + proto + `\b.*--dport ` + port + `\b.*-j ACCEPT\s*$`)
			if !re.MatchString(rules) {
				t.Errorf("%s: no ACCEPT for %s/%s on eth0:\n%s", fam, proto, port, rules)
			}
		}
		for _, p := range []string{"22", "80", "1883", "5683"} {
			if regexp.MustCompile(`(?m)^-A .*--dports? (\S*,)?` + p + `\b.*-j ACCEPT\s*$`).MatchString(rules) {
				t.Errorf("%s: port %s is accepted:\n%s", fam, p, rules)
			}
		}
	}

	// Listening sockets: only bastiond's, plus DHCP client sockets.
	allowed := map[string]bool{"tcp:443": true, "tcp:8883": true, "udp:5684": true, "udp:5685": true,
		"udp:68": true, "udp:546": true}
	for _, line := range strings.Split(rep["sockets"].body, "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		local := f[4]
		host, port, err := net.SplitHostPort(local)
		if err != nil {
			t.Errorf("cannot parse socket line %q", line)
			continue
		}
		if ip := net.ParseIP(strings.Trim(strings.Split(host, "%")[0], "[]")); ip != nil && ip.IsLoopback() {
			continue // loopback cannot be reached from the network
		}
		if !allowed[f[0]+":"+port] {
			t.Errorf("unexpected listening socket %q; all sockets:\n%s", line, rep["sockets-all"].body)
		}
	}

	// Read-only root, state partition without exec.
	mounts := map[string]string{}
	for _, line := range strings.Split(rep["mounts"].body, "\n") {
		if f := strings.Fields(line); len(f) == 3 {
			mounts[f[0]] = f[1] + " " + f[2]
		}
	}
	if !regexp.MustCompile(`^ext4 ro[,$]`).MatchString(mounts["/"]) {
		t.Errorf("root filesystem is not mounted read-only: %q", mounts["/"])
	}
	st := mounts["/var/lib/bastion"]
	for _, opt := range []string{"rw", "nosuid", "nodev", "noexec"} {
		if !regexp.MustCompile(`[ ,]` + opt + `(,|$)`).MatchString(st) {
			t.Errorf("/var/lib/bastion mount %q lacks %s", st, opt)
		}
	}

	// sysctl hardening applied.
	want := map[string]string{
		"kernel.kptr_restrict": "2", "kernel.dmesg_restrict": "1", "kernel.unprivileged_bpf_disabled": "1",
		"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.accept_redirects": "0", "net.ipv4.tcp_syncookies": "1",
		"kernel.sysrq": "0",
	}
	got := map[string]string{}
	for _, line := range strings.Split(rep["sysctl"].body, "\n") {
		if k, v, ok := strings.Cut(line, " = "); ok {
			got[k] = v
		}
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("sysctl (-want +got):\n%s", d)
	}

	// bastiond's effective confinement, read from /proc, not from the unit.
	status := map[string]string{}
	for _, line := range strings.Split(rep["bastiond-status"].body, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			status[k] = strings.TrimSpace(v)
		}
	}
	if bnd, err := strconv.ParseUint(status["CapBnd"], 16, 64); err != nil || bnd&^wantCapBnd != 0 {
		t.Errorf("bastiond capability bounding set %q holds more than NET_ADMIN, NET_BIND_SERVICE, NET_RAW", status["CapBnd"])
	}
	// Not root: its own user, holding (ambient, for the iptables it runs)
	// exactly the capabilities of the bounding set.
	if uids := strings.Fields(status["Uid"]); len(uids) != 4 || slices.Contains(uids, "0") {
		t.Errorf("bastiond Uid = %q, want a non-root user in all four fields", status["Uid"])
	}
	for _, k := range []string{"CapEff", "CapAmb"} {
		if v, err := strconv.ParseUint(status[k], 16, 64); err != nil || v != wantCapBnd {
			t.Errorf("bastiond %s = %q, want exactly NET_ADMIN, NET_BIND_SERVICE, NET_RAW (%x)", k, status[k], wantCapBnd)
		}
	}
	if status["NoNewPrivs"] != "1" {
		t.Errorf("bastiond NoNewPrivs = %q, want 1", status["NoNewPrivs"])
	}
	if status["Seccomp"] != "2" {
		t.Errorf("bastiond Seccomp = %q, want 2 (filter)", status["Seccomp"])
	}

	if s := strings.TrimSpace(rep["failed-units"].body); s != "" {
		t.Errorf("failed units in the guest:\n%s", s)
	}
	if pw := strings.TrimSpace(rep["root-password"].body); pw != "*" && !strings.HasPrefix(pw, "!") {
		t.Errorf("root has a usable password hash in the image")
	}
}

// buildDevicesim builds cmd/devicesim from this tree for the host.
func buildDevicesim(t *testing.T, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "devicesim")
	cmd := exec.Command("go", "build", "-o", out, "github.com/bastion-iot/bastion/cmd/devicesim")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build devicesim: %v: %s", err, b)
	}
	return out
}

// runDevicesim runs devicesim inside the namespace and checks that the
// gateway accepted every message it sent.
func runDevicesim(ctx context.Context, t *testing.T, ns *netns, devicesim string, args ...string) {
	t.Helper()
	dctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := child.DieWithTest(exec.CommandContext(dctx, "ip", append([]string{"netns", "exec", ns.name, devicesim}, args...)...))
	out, err := cmd.CombinedOutput()
	t.Logf("devicesim %s:\n%s", strings.Join(args, " "), out)
	if err != nil {
		t.Errorf("devicesim %s: %v", strings.Join(args, " "), err)
		return
	}
	if !regexp.MustCompile(`sent 3, accepted 3, refused 0`).Match(out) {
		t.Errorf("devicesim %s: not every message was accepted:\n%s", strings.Join(args, " "), out)
	}
}

// checkDefaultDeny checks an iptables-save filter table: INPUT either has a
// DROP policy, or its first rule jumps to a chain whose last rule drops
// everything unconditionally.
func checkDefaultDeny(rules string) error {
	if regexp.MustCompile(`(?m)^:INPUT DROP`).MatchString(rules) {
		return nil
	}
	var input []string
	chains := map[string][]string{}
	for _, line := range strings.Split(rules, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "-A" {
			continue
		}
		chains[f[1]] = append(chains[f[1]], line)
		if f[1] == "INPUT" {
			input = append(input, line)
		}
	}
	if len(input) == 0 {
		return errors.New("INPUT has an ACCEPT policy and no rules")
	}
	m := regexp.MustCompile(`^-A INPUT (-m comment --comment "[^"]*" )?-j (\S+)\s*$`).FindStringSubmatch(input[0])
	if m == nil {
		return fmt.Errorf("first INPUT rule %q is not an unconditional jump", input[0])
	}
	target := chains[m[2]]
	if len(target) == 0 {
		return fmt.Errorf("INPUT jumps to %s, which is empty", m[2])
	}
	last := target[len(target)-1]
	if !regexp.MustCompile(`^-A \S+ (-m comment --comment "[^"]*" )?-j (DROP|REJECT)\b`).MatchString(last) {
		return fmt.Errorf("%s does not end in an unconditional DROP: %q", m[2], last)
	}
	return nil
}

// tlsChainCheck completes a TLS handshake and checks that the server's chain
// ends at the image's own root.
// recoverConsole sets the password of a new admin "owner" on the console at
// addr with a recovery code, logs in with it, and checks the code does not
// work twice.
func recoverConsole(ctx context.Context, ns *netns, addr string, roots *x509.CertPool, code string) error {
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext:     func(ctx context.Context, network, a string) (net.Conn, error) { return ns.dial(ctx, network, a) },
		TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: guestIP},
	}}
	defer hc.CloseIdleConnections()
	post := func(path string, body map[string]string) (int, error) {
		b, _ := json.Marshal(body)
		req, err := http.NewRequestWithContext(ctx, "POST", "https://"+addr+path, bytes.NewReader(b))
		if err != nil {
			return 0, err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	in := map[string]string{"code": code, "user": "owner", "password": "boot test passphrase 42"}
	if st, err := post("/api/v1/recover", in); err != nil || st != http.StatusOK {
		return fmt.Errorf("POST /api/v1/recover: HTTP %d, %v", st, err)
	}
	if st, err := post("/api/v1/session", map[string]string{"user": "owner", "password": in["password"]}); err != nil || st != http.StatusCreated {
		return fmt.Errorf("log in with the recovered password: HTTP %d, %v", st, err)
	}
	if st, err := post("/api/v1/recover", in); err != nil || st != http.StatusForbidden {
		return fmt.Errorf("the code was accepted twice: HTTP %d, %v", st, err)
	}
	return nil
}

func tlsChainCheck(ctx context.Context, ns *netns, addr string, roots *x509.CertPool) error {
	cfg := &tls.Config{
		RootCAs: roots,
		// The address the banner tells people to browse to: the lan
		// interface's DHCP address in qemu's user network.
		ServerName: guestIP,
		MinVersion: tls.VersionTLS12,
	}
	hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	raw, err := ns.dial(hctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect %s: %w", addr, err)
	}
	c := tls.Client(raw, cfg)
	defer c.Close()
	if err := c.HandshakeContext(hctx); err != nil {
		return fmt.Errorf("TLS handshake verifying against the image's CA: %w", err)
	}
	cs := c.ConnectionState()
	if len(cs.VerifiedChains) == 0 {
		return errors.New("no verified chain")
	}
	return nil
}

// countingConn counts datagrams from the server, to tell a server that
// refused the handshake from one that never answered.
type countingConn struct {
	net.PacketConn
	mu sync.Mutex
	n  int
}

func (c *countingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		c.mu.Lock()
		c.n++
		c.mu.Unlock()
	}
	return n, a, err
}

func (c *countingConn) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func dtlsPSKHandshake(ctx context.Context, ns *netns, addr *net.UDPAddr, identity, hexKey string) error {
	key, err := hexDecode(hexKey)
	if err != nil {
		return fmt.Errorf("psk from bastionctl: %w", err)
	}
	pc, err := ns.listenUDP()
	if err != nil {
		return err
	}
	defer pc.Close()
	c, err := dtls.Client(pc, addr, &dtls.Config{
		PSK:             func([]byte) ([]byte, error) { return key, nil },
		PSKIdentityHint: []byte(identity),
		CipherSuites:    []dtls.CipherSuiteID{dtls.TLS_PSK_WITH_AES_128_CCM_8, dtls.TLS_PSK_WITH_AES_128_GCM_SHA256},
	})
	if err != nil {
		return err
	}
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.HandshakeContext(hctx); err != nil {
		return fmt.Errorf("DTLS PSK handshake as %q: %w", identity, err)
	}
	return nil
}

// dtlsAnswers starts a certificate DTLS handshake without a client
// certificate and reports how many datagrams the server sent back.
func dtlsAnswers(ctx context.Context, ns *netns, addr *net.UDPAddr, roots *x509.CertPool) (int, error) {
	pc, err := ns.listenUDP()
	if err != nil {
		return 0, err
	}
	cc := &countingConn{PacketConn: pc}
	defer cc.Close()
	c, err := dtls.Client(cc, addr, &dtls.Config{RootCAs: roots, ServerName: "bastion"})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err = c.HandshakeContext(hctx)
	return cc.count(), err
}

func hexDecode(s string) ([]byte, error) {
	if len(s)%2 != 0 {
		return nil, fmt.Errorf("hex key has odd length %d", len(s))
	}
	b := make([]byte, len(s)/2)
	for i := range b {
		v, err := strconv.ParseUint(s[2*i:2*i+2], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("hex key: %w", err)
		}
		b[i] = byte(v)
	}
	return b, nil
}

// Probes that make a listening service of the usual kinds say something.
var (
	httpProbe = []byte("GET / HTTP/1.0\r\nHost: bastion\r\n\r\n")
	// MQTT 3.1.1 CONNECT, client id "x", clean session.
	mqttProbe = []byte{0x10, 13, 0, 4, 'M', 'Q', 'T', 'T', 4, 2, 0, 60, 0, 1, 'x'}
	// CoAP CON GET /.well-known/core.
	coapProbe = append(append([]byte{0x40, 0x01, 0x12, 0x34, 0xbb}, ".well-known"...), append([]byte{0x04}, "core"...)...)
	// DNS (and mDNS/LLMNR) query for "bastion" A.
	dnsProbe = []byte{0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, 'b', 'a', 's', 't', 'i', 'o', 'n', 0, 0, 1, 0, 1}
	// NTP v3 client request.
	ntpProbe = append([]byte{0x1b}, make([]byte, 47)...)
	// SNMPv2c get sysDescr.0 with community "public".
	snmpProbe = []byte{0x30, 0x26, 0x02, 0x01, 0x01, 0x04, 0x06, 'p', 'u', 'b', 'l', 'i', 'c',
		0xa0, 0x19, 0x02, 0x01, 0x01, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00,
		0x30, 0x0e, 0x30, 0x0c, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x02, 0x01, 0x01, 0x01, 0x00, 0x05, 0x00}
	ssdpProbe = []byte("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: ssdp:all\r\n\r\n")
)

func udpProbe(port int) []byte {
	switch port {
	case 53, 5353, 5355:
		return dnsProbe
	case 123:
		return ntpProbe
	case 161:
		return snmpProbe
	case 1900:
		return ssdpProbe
	case 5683:
		return coapProbe
	}
	return httpProbe
}

// checkSilent sends each silent port a probe its usual service would answer,
// and fails if anything comes back. User-mode networking accepts every
// forwarded TCP connection on the host side, so "answers" means data, not a
// completed connect.
func checkSilent(ctx context.Context, t *testing.T, ns *netns, hostPort map[string]int) {
	t.Helper()
	type result struct {
		port string
		got  []byte
	}
	results := make(chan result, len(silentTCP)+len(silentUDP)+1)
	var wg sync.WaitGroup
	probe := func(proto string, guest int, payload []byte) {
		defer wg.Done()
		name := fmt.Sprintf("%s/%d", proto, guest)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort[name]))
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		c, err := ns.dial(pctx, proto, addr)
		if err != nil {
			results <- result{port: name}
			return
		}
		defer c.Close()
		dl, _ := pctx.Deadline()
		c.SetDeadline(dl)
		c.Write(payload)
		buf := make([]byte, 256)
		n, _ := c.Read(buf)
		results <- result{port: name, got: buf[:n]}
	}
	// Control: the same probe to the console port must get an answer (Go's
	// TLS server answers plain HTTP with a 400), or the probe proves nothing.
	wg.Add(1)
	go probe("tcp", 443, httpProbe)
	for _, p := range silentTCP {
		wg.Add(1)
		payload := httpProbe
		if p == 1883 {
			payload = mqttProbe
		}
		go probe("tcp", p, payload)
	}
	for _, p := range silentUDP {
		wg.Add(1)
		go probe("udp", p, udpProbe(p))
	}
	wg.Wait()
	close(results)
	for r := range results {
		if r.port == "tcp/443" {
			if len(r.got) == 0 {
				t.Errorf("control probe to tcp/443 got no answer: the silent-port probes cannot see a listener")
			}
			continue
		}
		if len(r.got) > 0 {
			t.Errorf("%s answered a probe (must be silent): %q", r.port, r.got)
		}
	}
}

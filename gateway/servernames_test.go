package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"

	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/pki"
)

// fakeLAN is an address source for the lan interfaces whose addresses a
// test changes (Options.LANAddrs).
type fakeLAN struct {
	mu    sync.Mutex
	addrs map[string][]net.Addr
	fail  error // what reading the addresses returns, if set
}

// failing makes reading the addresses fail with err (nil: succeed).
func (f *fakeLAN) failing(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// set gives interface name the addresses cidrs ("192.0.2.7/24"); none
// removes it, as an interface not there yet.
func (f *fakeLAN) set(t *testing.T, name string, cidrs ...string) {
	t.Helper()
	var as []net.Addr
	for _, c := range cidrs {
		ip, n, err := net.ParseCIDR(c)
		if err != nil {
			t.Fatal(err)
		}
		as = append(as, &net.IPNet{IP: ip, Mask: n.Mask})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.addrs == nil {
		f.addrs = map[string][]net.Addr{}
	}
	if len(as) == 0 {
		delete(f.addrs, name)
		return
	}
	f.addrs[name] = as
}

func (f *fakeLAN) Addrs(name string) ([]net.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	return slices.Clone(f.addrs[name]), nil
}

// startWithLAN runs a dev gateway whose lan interface lan0 has the
// addresses of lan.
func startWithLAN(t *testing.T, lan *fakeLAN) *running {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	cfg := testConfig(dir)
	cfg.Firewall.LAN = []string{"lan0"}
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	r := runGateway(t, Options{Dev: true, StateDir: dir, Log: discard, Out: &bytes.Buffer{}, LANAddrs: lan.Addrs}, 10*time.Second)
	t.Cleanup(func() { r.stop(t) })
	return r
}

// TestServerCertsFollowLAN: a gateway that started before its lan
// interface had an address (booted unplugged, slow DHCP) serves, after the
// renewal pass, certificates that name the address the interface got, on
// every running listener and without a restart: a client that verifies
// the gateway by that address succeeds over the console's HTTPS, MQTT/TLS
// and CoAP/DTLS. When the address changes (a new lease), the next pass
// names the new one and drops the old.
func TestServerCertsFollowLAN(t *testing.T) {
	lan := &fakeLAN{}
	r := startWithLAN(t, lan)
	g := r.g
	addrs := g.Addrs()
	roots := g.CA().RootPool()

	key, csr := deviceCSR(t)
	creds, err := g.Devices().Add(AddRequest{Name: "sensor", Auth: "cert", CSR: csr}, Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(creds.CertPEM))
	devCert := tls.Certificate{Certificate: [][]byte{blk.Bytes}, PrivateKey: key}

	// Each reports whether a client verifying the gateway as name accepted
	// the listener's certificate (VerifyConnection runs only after the
	// chain and the name verified), and the handshake's error.
	viaTLS := func(addr, name string, certs []tls.Certificate) (bool, error) {
		verified := false
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
			RootCAs: roots, ServerName: name, Certificates: certs,
			VerifyConnection: func(tls.ConnectionState) error { verified = true; return nil },
		})
		if err == nil {
			c.Close()
		}
		return verified, err
	}
	viaDTLS := func(name string) (bool, error) {
		verified := false
		raddr, err := net.ResolveUDPAddr("udp", addrs["coaps"])
		if err != nil {
			return false, err
		}
		conn, err := piondtls.Dial("udp", raddr, &piondtls.Config{
			RootCAs: roots, ServerName: name, Certificates: []tls.Certificate{devCert},
			CipherSuites: pki.DTLSCertSuites, ExtendedMasterSecret: piondtls.RequireExtendedMasterSecret,
			VerifyConnection: func(*piondtls.State) error { verified = true; return nil },
		})
		if err != nil {
			return false, err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err = conn.HandshakeContext(ctx)
		return verified, err
	}
	listeners := []struct {
		name   string
		verify func(ip string) (bool, error)
	}{
		{"console", func(ip string) (bool, error) { return viaTLS(addrs["console"], ip, nil) }},
		{"mqtt", func(ip string) (bool, error) { return viaTLS(addrs["mqtts"], ip, []tls.Certificate{devCert}) }},
		{"coap", viaDTLS},
	}
	// expect checks that each listener's certificate verifies as ip, or
	// that it is refused for not naming ip (not for anything else, which
	// would make the check pass for nothing).
	expect := func(when, ip string, want bool) {
		t.Helper()
		for _, l := range listeners {
			ok, err := l.verify(ip)
			var he x509.HostnameError
			switch {
			case want && (!ok || err != nil):
				t.Errorf("%s: %s: a client verifying the gateway as %s: accepted %v, %v; want it to succeed", when, l.name, ip, ok, err)
			case !want && (ok || !errors.As(err, &he)):
				t.Errorf("%s: %s: a client verifying the gateway as %s: accepted %v, %v; want a certificate not valid for %s", when, l.name, ip, ok, err, ip)
			}
		}
	}

	expect("no lan address yet", "192.0.2.7", false)
	g.renewServerCerts()
	expect("a pass with still no lan address", "192.0.2.7", false)

	lan.set(t, "lan0", "192.0.2.7/24", "2001:db8::7/64", "fe80::7/64")
	expect("the address came, before the pass", "192.0.2.7", false)
	g.renewServerCerts()
	expect("after the pass", "192.0.2.7", true)
	expect("after the pass", "2001:db8::7", true)
	expect("after the pass (hostnames kept)", "127.0.0.1", true)
	for name, lc := range g.certs {
		if ips := lc.cert.Leaf().IPAddresses; slices.ContainsFunc(ips, func(ip net.IP) bool { return ip.IsLinkLocalUnicast() }) {
			t.Errorf("%s: certificate names a link-local address: %v", name, ips)
		}
	}

	// A new lease.
	lan.set(t, "lan0", "192.0.2.8/24", "2001:db8::7/64")
	g.renewServerCerts()
	expect("after a new lease", "192.0.2.8", true)
	expect("after a new lease", "192.0.2.7", false)

	// A failure to read the addresses is no change of them: the
	// certificates keep their names rather than drop the lan's.
	lan.failing(errors.New("netlinkrib: no buffer space available"))
	g.renewServerCerts()
	expect("after a pass that could not read the addresses", "192.0.2.8", true)
	lan.failing(nil)

	// Every listener's certificate, the firmware's included when it runs,
	// went the same way.
	for name, lc := range g.certs {
		if !slices.ContainsFunc(lc.cert.Leaf().IPAddresses, func(ip net.IP) bool { return ip.Equal(net.ParseIP("192.0.2.8")) }) {
			t.Errorf("%s: certificate names %v, want 192.0.2.8 among them", name, lc.cert.Leaf().IPAddresses)
		}
	}
	// A pass with nothing changed issues nothing.
	before := map[string]string{}
	for name, lc := range g.certs {
		before[name] = pki.Serial(lc.cert.Leaf())
	}
	g.renewServerCerts()
	for name, lc := range g.certs {
		if s := pki.Serial(lc.cert.Leaf()); s != before[name] {
			t.Errorf("%s: a pass with the same addresses re-issued the certificate (%s, was %s)", name, s, before[name])
		}
	}
}

// TestESTCertFollowsLAN: EST over HTTPS, opened with each pairing window,
// gets a certificate naming the lan's addresses of that moment: a window
// opened after the address changed does not serve the certificate of the
// window before.
func TestESTCertFollowsLAN(t *testing.T) {
	lan := &fakeLAN{}
	lan.set(t, "lan0", "192.0.2.7/24")
	g := startPairingWith(t, func(c *config.Config) {
		c.Pairing.ESTListen = "127.0.0.1:0"
		c.Firewall.LAN = []string{"lan0"}
	}, func(g *Gateway) { g.opts.LANAddrs = lan.Addrs })
	names := func(when string) []net.IP {
		t.Helper()
		ln, err := g.g.pairing.listenEST()
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		ln.Close()
		return g.g.pairing.estCert.Leaf().IPAddresses
	}
	has := func(ips []net.IP, want string) bool {
		return slices.ContainsFunc(ips, func(ip net.IP) bool { return ip.Equal(net.ParseIP(want)) })
	}
	if ips := names("first window"); !has(ips, "192.0.2.7") {
		t.Fatalf("first window: EST certificate names %v, want 192.0.2.7 among them", ips)
	}
	lan.set(t, "lan0", "192.0.2.8/24")
	if ips := names("window after a new lease"); !has(ips, "192.0.2.8") || has(ips, "192.0.2.7") {
		t.Errorf("window after a new lease: EST certificate names %v, want 192.0.2.8 and not 192.0.2.7", ips)
	}
}

// TestInterfaceAddrs: an interface that is not there has no addresses (a
// definite answer, which the certificates follow), not an error (which
// they would not); one that is there has its own.
func TestInterfaceAddrs(t *testing.T) {
	if as, err := interfaceAddrs("bastion-none0"); err != nil || len(as) != 0 {
		t.Errorf("interfaceAddrs of a missing interface = %v, %v; want none and no error", as, err)
	}
	as, err := interfaceAddrs("lo")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(as, func(a net.Addr) bool { ipn, ok := a.(*net.IPNet); return ok && ipn.IP.Equal(net.IPv4(127, 0, 0, 1)) }) {
		t.Errorf("interfaceAddrs(lo) = %v, want 127.0.0.1 among them", as)
	}
	// firewall.lan accepts iptables' wildcard: "l+" is every interface
	// whose name starts with "l", lo among them.
	as, err = interfaceAddrs("l+")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(as, func(a net.Addr) bool { ipn, ok := a.(*net.IPNet); return ok && ipn.IP.Equal(net.IPv4(127, 0, 0, 1)) }) {
		t.Errorf("interfaceAddrs(l+) = %v, want lo's 127.0.0.1 among them", as)
	}
}

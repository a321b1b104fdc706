package gateway

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/refusal"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// httpsRefusalCount is bastion_https_handshake_refusals_total{server,
// reason}, 0 if it has no such series.
func httpsRefusalCount(t *testing.T, g *Gateway, server, reason string) float64 {
	t.Helper()
	mfs, err := g.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "bastion_https_handshake_refusals_total" {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if (l.GetName() == "server" && l.GetValue() != server) || (l.GetName() == "reason" && l.GetValue() != reason) {
					continue next
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// eventually reports whether cond held within 5 s.
func eventually(cond func() bool) bool {
	for range 500 {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}

// Refused TLS handshakes on the gateway's own HTTPS servers (firmware, EST
// over HTTPS while a pairing window is open, the console), which anyone
// on the LAN can cause at the rate they can open connections, cannot
// flood the log: each kind (a client certificate not accepted, plaintext,
// no client certificate, a failed handshake) is counted every time in
// bastion_https_handshake_refusals_total but logged at most once per
// 10 s, saying how many were not logged, and a refused certificate's
// claimed id and error (which quotes its CN) are cut. Before, the
// firmware server wrote a line per refused certificate with its whole CN
// (here 2,000 bytes; a certificate may carry far more), and net/http one
// more per failed handshake (at debug level; on the EST server at warn).
func TestHTTPSRefusedHandshakesDoNotFloodTheLog(t *testing.T) {
	const n, parallel = 200, 8
	v := newFWVendor(t)
	acmeRoot, _ := vendorCA(t, "acme")
	files := t.TempDir()
	rootFile := filepath.Join(files, "acme.pem")
	if err := errors.Join(os.WriteFile(rootFile, acmeRoot, 0o644),
		os.WriteFile(filepath.Join(files, "root.json"), v.repo.RootJSON(), 0o600),
		os.WriteFile(filepath.Join(files, "vendor-ca.pem"), v.repo.CertPEM(), 0o600)); err != nil {
		t.Fatal(err)
	}
	g := startPairingWith(t, func(c *config.Config) {
		c.Firmware.Enabled = true
		c.Firmware.RepositoryURL = v.repo.URL()
		c.Firmware.TrustedRoot = filepath.Join(files, "root.json")
		c.Firmware.CABundle = filepath.Join(files, "vendor-ca.pem")
		c.Firmware.HTTPSListen = "127.0.0.1:0"
		c.Pairing.Vendors = map[string]string{"acme": rootFile}
		c.Pairing.ESTListen = "127.0.0.1:0"
	}, nil)
	g.press(t, 1500*time.Millisecond)
	waitFor(t, "EST over HTTPS opens with the window", func() bool { return g.g.pairing.ESTAddr() != "" })

	cn := strings.Repeat("x", 2000)
	stranger := testpki.SelfSigned(t, cn)
	roots := g.g.CA().RootPool()
	tlsWith := func(certs []tls.Certificate) func(c net.Conn) (net.Conn, error) {
		return func(c net.Conn) (net.Conn, error) {
			tc := tls.Client(c, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: "127.0.0.1", Certificates: certs})
			return tc, tc.Handshake()
		}
	}
	write := func(b []byte) func(c net.Conn) (net.Conn, error) {
		return func(c net.Conn) (net.Conn, error) {
			_, err := c.Write(b)
			return c, err
		}
	}
	servers := []struct {
		name       string
		addr       string
		clientAuth bool // asks for a client certificate
		certOpt    bool // but takes a handshake without one
	}{
		{"firmware", g.g.FirmwareHTTPSAddr().String(), true, false},
		// Setup-code devices have no certificate: they prove themselves
		// in the requests (pairing_pake_https.go).
		{"est", g.g.pairing.ESTAddr(), true, true},
		{"console", g.g.Addrs()["console"], false, false},
	}
	kinds := []struct {
		name       string
		reason     string
		clientAuth bool // only on a server that asks for a client certificate
		hello      func(c net.Conn) (net.Conn, error)
	}{
		{"certificate of another CA", hub.ReasonWrongCA, true, tlsWith([]tls.Certificate{stranger})},
		{"plaintext", hub.ReasonPlaintext, false, write([]byte("GET /fw/offer HTTP/1.1\r\nHost: gw\r\n\r\n"))},
		{"no client certificate", hub.ReasonNoCredentials, true, tlsWith(nil)},
		// A handshake record holding a ClientHello one byte long.
		{"handshake failed", hub.ReasonHandshakeFailed, false, write([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00})},
	}
	for _, srv := range servers {
		for _, k := range kinds {
			if k.clientAuth && !srv.clientAuth || k.reason == hub.ReasonNoCredentials && srv.certOpt {
				continue
			}
			t.Run(srv.name+"/"+k.name, func(t *testing.T) {
				count := func() float64 { return httpsRefusalCount(t, g.g, srv.name, k.reason) }
				before := count()
				mark := len(g.log.String())
				start := time.Now()
				next := make(chan struct{}, n)
				for range n {
					next <- struct{}{}
				}
				close(next)
				var wg sync.WaitGroup
				for w := range parallel {
					// Each worker from an address of its own: a client
					// sees its connection refused (an alert) before the
					// server has closed it and given its place among the
					// unauthenticated back, so the workers of one address
					// could briefly hold more than the firmware
					// listener's fwMaxUnauthPerSource, past which a new
					// one is refused for that instead.
					from := &net.TCPAddr{IP: net.IPv4(127, 0, 2, byte(1+w))}
					wg.Go(func() {
						for range next {
							if err := refusal.EndedFrom(from, srv.addr, k.hello); err != nil {
								t.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				// A line goes out before its refusal is counted: once all
				// are counted, the lines are all there.
				counted := eventually(func() bool { return count()-before >= n })
				elapsed := time.Since(start)
				var lines []string
				for _, l := range strings.Split(g.log.String()[mark:], "\n") {
					if strings.Contains(strings.ToLower(l), "handshake") {
						lines = append(lines, l)
					}
				}
				if most := 1 + int(elapsed/(10*time.Second)); len(lines) > most {
					t.Errorf("%d log lines about handshakes for %d refused connections in %v, want at most %d (one per 10s): %.300q…",
						len(lines), n, elapsed.Round(time.Millisecond), most, lines[0])
				}
				if got := count() - before; !counted || got != n {
					t.Errorf("%v refusals counted in bastion_https_handshake_refusals_total{server=%q,reason=%q} for %d refused connections, want each counted once",
						got, srv.name, k.reason, n)
				}
				if len(lines) == 0 {
					t.Fatal("no log line about the refused handshakes")
				}
				for _, l := range lines {
					if !strings.Contains(l, "not_logged_since_last_line=") {
						t.Errorf("log line does not say how many were not logged: %.300q…", l)
						break
					}
					if strings.Contains(l, strings.Repeat("x", 257)) || len(l) > 1200 {
						t.Errorf("log line of %d bytes holds the certificate's CN uncut: %.300q…", len(l), l)
						break
					}
				}
				if k.reason != hub.ReasonWrongCA {
					return
				}
				if l := linesWith(lines, "reason="+hub.ReasonWrongCA, "(2000 bytes)"); len(l) != len(lines) {
					t.Errorf("%d of %d log lines with reason=%s and the CN cut, marked with its length, want all: %.300q…", len(l), len(lines), hub.ReasonWrongCA, lines[0])
				}
			})
		}
	}
}

// linesWith are the lines that hold every one of parts.
func linesWith(lines []string, parts ...string) []string {
	var out []string
next:
	for _, l := range lines {
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

// The ErrorLog's lines that are not about a handshake (an accept error, a
// handler's panic, a request's query with ';') are logged as they are but
// spaced too; the line net/http writes for a handshake whose certificate
// the verify callback refused (and counted, and logged) is neither
// counted nor logged again.
func TestHTTPSErrorLogOtherLines(t *testing.T) {
	lb := &logbuf.Buffer{}
	m := newMetrics(func() float64 { return 0 })
	r := &httpsRefusals{server: "test", prefix: "test https", log: slog.New(slog.NewTextHandler(lb, nil)), level: slog.LevelWarn,
		count: m.httpsRefusals, lines: ratelog.New(time.Hour)}
	el := r.errorLog()
	for range 5 {
		el.Printf("http: Accept error: %v; retrying in %v", errors.New("accept tcp: too many open files"), 5*time.Millisecond)
		el.Printf("http: TLS handshake error from %s: %v", "192.0.2.1:4711", &certRefused{reason: hub.ReasonWrongCA})
	}
	if l := lb.Lines("http: Accept error: accept tcp: too many open files; retrying in 5ms", "level=WARN", "not_logged_since_last_line=0"); len(l) != 1 {
		t.Errorf("%d lines of the accept error written 5 times within the interval, want 1:\n%s", len(l), lb.String())
	}
	if l := lb.Lines("handshake"); len(l) != 0 {
		t.Errorf("lines about a handshake whose certificate the verify callback refused: %q, want none (its line is the callback's)", l)
	}
	if n := testutil.CollectAndCount(m.httpsRefusals); n != 0 {
		t.Errorf("%d series counted for handshakes whose certificate the verify callback refused, want none (it counts them)", n)
	}
}

// A handler's panic is logged every time, at Error, with its stack (cut
// when long), never spaced away behind another line; an Accept error and
// a request's trouble each have their own kind, spaced.
func TestHTTPSErrorLogPanicAlwaysLogged(t *testing.T) {
	lb := &logbuf.Buffer{}
	m := newMetrics(func() float64 { return 0 })
	r := &httpsRefusals{server: "test", prefix: "test https", log: slog.New(slog.NewTextHandler(lb, nil)), level: slog.LevelWarn,
		count: m.httpsRefusals, lines: ratelog.New(time.Hour)}
	el := r.errorLog()
	stack := "goroutine 7 [running]:\nnet/http.(*conn).serve.func1()\n" + strings.Repeat("\tframe.go:1 +0x1\n", 4000)
	for range 3 {
		el.Printf("http: Accept error: %v; retrying in %v", errors.New("accept tcp: too many open files"), 5*time.Millisecond)
		el.Printf("http: URL query contains semicolon, which is no longer a supported separator; parts of the query may be stripped when parsed; see golang.org/issue/25192")
		el.Printf("http: panic serving %s: %v\n%s", "192.0.2.1:4711", "runtime error: index out of range [3] with length 3", stack)
	}
	panics := lb.Lines("level=ERROR", "test https: handler panic", "remote=192.0.2.1:4711", "index out of range [3] with length 3", "goroutine 7 [running]")
	if len(panics) != 3 {
		t.Errorf("%d panic lines for 3 panics among other lines, want 3:\n%s", len(panics), lb.String())
	}
	for _, l := range panics {
		// The text handler writes \n and \t as two bytes each.
		if len(l) > 2*maxPanicStack+1024 || !strings.Contains(l, "… ("+strconv.Itoa(len(stack)-1)+" bytes)") {
			t.Errorf("panic line of %d bytes, want the %d-byte stack cut to %d:\n%.300s", len(l), len(stack), maxPanicStack, l)
		}
	}
	if l := lb.Lines("http: Accept error: accept tcp: too many open files", "level=WARN"); len(l) != 1 {
		t.Errorf("%d lines of the accept error written 3 times within the interval, want 1:\n%s", len(l), lb.String())
	}
	if l := lb.Lines("http: URL query contains semicolon", "level=WARN"); len(l) != 1 {
		t.Errorf("%d lines of a request's trouble written 3 times within the interval, want 1 (its own kind, not hidden by the accept error):\n%s", len(l), lb.String())
	}
}

package mqtt

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/refusal"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

// refusedConn is refusal.Ended for r's server, hello given r.
func refusedConn(r *rig, hello func(r *rig, c net.Conn) (net.Conn, error)) error {
	return refusal.Ended(r.s.Addr(), func(c net.Conn) (net.Conn, error) { return hello(r, c) })
}

// Refused handshakes, which anyone who reaches the port can cause at the
// rate they can open connections, cannot flood the log: each kind (a
// certificate not accepted, by reason; plaintext; no client certificate;
// a failed TLS handshake) is counted every time but logged at most once
// per 10 s, saying how many were not logged, and a refused certificate's
// claimed id and error (which quotes its CN) are cut. Before, every one
// wrote a line, a certificate's with its whole CN twice over (here 2,000
// bytes; a certificate may carry far more).
func TestRefusedHandshakesDoNotFloodTheLog(t *testing.T) {
	const n, parallel = 200, 8
	cn := strings.Repeat("x", 2000)
	stranger := testpki.SelfSigned(t, cn)
	tlsTo := func(certs []tls.Certificate) func(r *rig, c net.Conn) (net.Conn, error) {
		return func(r *rig, c net.Conn) (net.Conn, error) {
			tc := tls.Client(c, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1", Certificates: certs})
			return tc, tc.Handshake()
		}
	}
	write := func(b []byte) func(r *rig, c net.Conn) (net.Conn, error) {
		return func(_ *rig, c net.Conn) (net.Conn, error) {
			_, err := c.Write(b)
			return c, err
		}
	}
	refusals := func(reason string) func(r *rig) float64 { return func(r *rig) float64 { return r.refusals(reason) } }
	for _, tc := range []struct {
		name  string
		line  string
		hello func(r *rig, c net.Conn) (net.Conn, error)
		count func(r *rig) float64
	}{
		{"certificate of another CA", "mqtt: handshake refused: device certificate not accepted", tlsTo([]tls.Certificate{stranger}), refusals(hub.ReasonWrongCA)},
		{"plaintext", "mqtt: connection refused: plaintext on the TLS port", write([]byte("\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04devx")), refusals(hub.ReasonPlaintext)},
		{"no client certificate", "mqtt: handshake refused: no client certificate", tlsTo(nil), refusals(hub.ReasonNoCredentials)},
		// A handshake record holding a ClientHello one byte long.
		{"handshake failed", "mqtt: TLS handshake failed", write([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00}),
			func(r *rig) float64 {
				return testutil.ToFloat64(r.hub.Metrics().Handshakes.WithLabelValues(hub.MQTT, "failed"))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lb := &logbuf.Buffer{}
			r := newRigClock(t, queue.Options{}, Config{}, nil, pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
			before := tc.count(r)
			start := time.Now()
			next := make(chan struct{}, n)
			for range n {
				next <- struct{}{}
			}
			close(next)
			var wg sync.WaitGroup
			for range parallel {
				wg.Go(func() {
					for range next {
						if err := refusedConn(r, tc.hello); err != nil {
							t.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			waitFor(t, "every refusal to be counted", func() bool { return tc.count(r)-before >= n })
			waitFor(t, "a log line", func() bool { return len(lb.Lines(tc.line)) > 0 })
			lines := lb.Lines(tc.line)
			elapsed := time.Since(start)
			if got := tc.count(r) - before; got != n {
				t.Errorf("%v refusals counted for %d refused connections, want each counted", got, n)
			}
			if most := 1 + int(elapsed/refusalLogEvery); len(lines) > most {
				t.Errorf("%d log lines for %d refused connections in %v, want at most %d (one per %v)", len(lines), n, elapsed.Round(time.Millisecond), most, refusalLogEvery)
			}
			for _, l := range lines {
				if !strings.Contains(l, "not_logged_since_last_line=") {
					t.Errorf("log line does not say how many were not logged: %.300q…", l)
					break
				}
				if strings.Contains(l, strings.Repeat("x", ratelog.MaxText+1)) || len(l) > 1200 {
					t.Errorf("log line of %d bytes holds the certificate's CN uncut: %.300q…", len(l), l)
					break
				}
			}
			if !strings.Contains(tc.line, "certificate not accepted") {
				return
			}
			if l := lb.Lines(tc.line, "reason="+hub.ReasonWrongCA, "(2000 bytes)"); len(l) != len(lines) {
				t.Errorf("%d of %d log lines with reason=%s and the CN cut, marked with its length, want all: %.300q…", len(l), len(lines), hub.ReasonWrongCA, lines[0])
			}
		})
	}
}

// Refused CONNECTs, which with allow_secret_auth anyone who reaches the
// port can cause without a certificate, at the rate they can open
// connections, cannot flood the log either: each is counted, but each
// reason is logged at most once per 10 s, saying how many were not
// logged, and the client id and user name the peer chose (up to 64 KiB
// each; here 3,000 bytes) are cut. Before, every refusal wrote a line
// with both whole. A refusal after the credentials proved a device (here
// a client id that is not the certificate's device) is logged each time,
// cut likewise: only a holder of the device's credentials causes it.
func TestRefusedConnectsDoNotFloodTheLog(t *testing.T) {
	const n, parallel = 200, 8
	longID, longUser := strings.Repeat("c", 3000), strings.Repeat("u", 3000)
	connect := func(clientID, user, secret string) []byte {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: clientID}}
		if user != "" {
			pk.Connect.Username, pk.Connect.UsernameFlag = []byte(user), true
			pk.Connect.Password, pk.Connect.PasswordFlag = []byte(secret), true
		}
		var b bytes.Buffer
		if err := pk.ConnectEncode(&b); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	lockout := SecretLockout{Free: 1000, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour}
	for _, tc := range []struct {
		name    string
		lockout SecretLockout
		cert    bool // a client certificate for device devc
		connect []byte
		lines   []string // of the refusals
		reasons []string // what they are counted as
		each    bool     // logged each time
	}{
		{"no credentials", lockout, false, connect(longID, "", ""),
			[]string{"mqtt: connect refused: no client certificate"}, []string{hub.ReasonNoCredentials}, false},
		{"bad secret", lockout, false, connect(longID, longUser, "wrong"),
			[]string{"mqtt: connect refused: secret login failed"}, []string{hub.ReasonBadSecret}, false},
		{"secret lockout", SecretLockout{Free: 1, Base: time.Hour, Max: time.Hour, Forget: time.Hour}, false, connect(longID, longUser, "wrong"),
			[]string{"mqtt: connect refused: secret login failed", "mqtt: connect refused: secret login not checked"},
			[]string{hub.ReasonBadSecret, hub.ReasonSecretLockout}, false},
		{"client id of another device", lockout, true, connect(longID, "", ""),
			[]string{"mqtt: connect refused: client id is not the authenticated device"}, []string{hub.ReasonClientID}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lb := &logbuf.Buffer{}
			var checks atomic.Int32
			r := newRigClock(t, queue.Options{}, Config{AllowSecretAuth: true, SecretLockout: tc.lockout},
				func(ca *pki.CA) bridges.Identity { return countingIdentity{caIdentity{ca}, &checks} },
				pki.SystemClock{}, slog.New(slog.NewTextHandler(lb, nil)))
			cfg := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1"}
			if tc.cert {
				cert, _ := r.issue(t, "devc")
				cfg.Certificates = []tls.Certificate{cert}
			}
			hello := func(_ *rig, c net.Conn) (net.Conn, error) {
				tc2 := tls.Client(c, cfg)
				if err := tc2.Handshake(); err != nil {
					return tc2, err
				}
				_, err := tc2.Write(tc.connect)
				return tc2, err
			}
			counted := func() float64 {
				var sum float64
				for _, reason := range tc.reasons {
					sum += r.refusals(reason)
				}
				return sum
			}
			start := time.Now()
			next := make(chan struct{}, n)
			for range n {
				next <- struct{}{}
			}
			close(next)
			var wg sync.WaitGroup
			for range parallel {
				wg.Go(func() {
					for range next {
						if err := refusedConn(r, hello); err != nil {
							t.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			waitFor(t, "every refusal to be counted", func() bool { return counted() >= n })
			elapsed := time.Since(start)
			if got := counted(); got != n {
				t.Errorf("%v refusals counted for %d refused CONNECTs, want each counted", got, n)
			}
			most := 1 + int(elapsed/refusalLogEvery)
			for _, line := range tc.lines {
				lines := lb.Lines(line)
				if tc.each {
					if len(lines) != n {
						t.Errorf("%d log lines %q for %d refused CONNECTs, want one each", len(lines), line, n)
					}
				} else if len(lines) == 0 || len(lines) > most {
					t.Errorf("%d log lines %q for %d refused CONNECTs in %v, want 1 to %d (one per %v)", len(lines), line, n, elapsed.Round(time.Millisecond), most, refusalLogEvery)
				}
				for _, l := range lines {
					if strings.Contains(l, strings.Repeat("c", ratelog.MaxText+1)) || strings.Contains(l, strings.Repeat("u", ratelog.MaxText+1)) || len(l) > 1500 {
						t.Errorf("log line of %d bytes holds the client id or user name uncut: %.300q…", len(l), l)
						break
					}
					if !strings.Contains(l, "(3000 bytes)") {
						t.Errorf("log line does not mark the client id as cut: %.300q…", l)
						break
					}
				}
			}
		})
	}
}

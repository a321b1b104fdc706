package upstream

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/eclipse/paho.golang/autopaho"
)

// TestDialTLSSuites: with upstream.tls_min_version "1.2", the link's dial
// refuses a TLS 1.2 broker that offers only a CBC suite (the suites
// crypto/tls would offer by default), and completes a handshake with one
// that offers an ECDHE AEAD suite, with an ECDSA or an RSA key (many cloud
// brokers have RSA keys). Real handshakes on loopback.
func TestDialTLSSuites(t *testing.T) {
	ca := testpki.New(t, t.TempDir(), "cloud")
	client := ca.Client(t, "gw1")
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecCert, rsaCert := brokerCert(t, ca, &ecKey.PublicKey, ecKey), brokerCert(t, ca, &rsaKey.PublicKey, rsaKey)
	for _, tc := range []struct {
		name  string
		cert  tls.Certificate
		suite uint16
		ok    bool
	}{
		{"ecdsa cbc", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, false},
		{"rsa cbc", rsaCert, tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA, false},
		{"ecdsa gcm", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, true},
		{"rsa gcm", rsaCert, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
				Certificates: []tls.Certificate{tc.cert},
				MinVersion:   tls.VersionTLS12,
				MaxVersion:   tls.VersionTLS12,
				CipherSuites: []uint16{tc.suite},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    ca.Pool(),
			})
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if c.(*tls.Conn).Handshake() == nil {
					c.Read(make([]byte, 1)) // until the link closes
				}
			}()
			defer func() { <-done }()

			cfg := Config{
				Broker:     "mqtts://" + ln.Addr().String(),
				ServerName: "broker.example",
				CAFile:     ca.CertFile, CertFile: client.CertFile, KeyFile: client.KeyFile,
				TLSMinVersion:  "1.2",
				Gateway:        "gw1",
				ConnectTimeout: 5 * time.Second,
				Forward:        []Rule{{Topic: "devices/+/t/#", Action: ActionForward}},
			}
			q, err := queue.Open(t.TempDir(), queue.Options{}, testLog(), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			up, err := New(cfg, q, nil, testLog(), nil)
			if err != nil {
				t.Fatal(err)
			}
			broker, err := url.Parse(cfg.Broker)
			if err != nil {
				t.Fatal(err)
			}
			c, err := up.dial(context.Background(), autopaho.ClientConfig{}, broker)
			if err != nil {
				if tc.ok {
					t.Errorf("dial a TLS 1.2 broker offering only %s: %v", tls.CipherSuiteName(tc.suite), err)
				} else if !strings.Contains(err.Error(), "handshake failure") {
					t.Errorf("dial a TLS 1.2 broker offering only %s: %v; want the broker's handshake_failure alert (no suite in common)", tls.CipherSuiteName(tc.suite), err)
				} else if e := explain1(err, &snapshot{cfg: cfg}); !strings.Contains(e.Error(), "no cipher suite in common") {
					t.Errorf("the operator is told %q; want it to name cipher suites as a cause", e)
				}
				return
			}
			defer c.Close()
			if !tc.ok {
				t.Errorf("dial a TLS 1.2 broker offering only %s succeeded; want it refused", tls.CipherSuiteName(tc.suite))
			}
			if got := c.(*packetConn).Conn.(*tls.Conn).ConnectionState().CipherSuite; got != tc.suite {
				t.Errorf("negotiated %s, want %s", tls.CipherSuiteName(got), tls.CipherSuiteName(tc.suite))
			}
		})
	}
}

// brokerCert is a broker certificate for broker.example from ca, for the
// key pub/priv (testpki's are ECDSA only).
func brokerCert(t *testing.T, ca *testpki.CA, pub, priv any) tls.Certificate {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "broker.example"},
		DNSNames:     []string{"broker.example"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca.Cert, pub, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}
}

package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"testing"
	"time"
)

// TestTLSClientSuites: with real handshakes on loopback, a TLS 1.2 server
// that offers only a CBC suite (ECDSA or RSA key) is refused by the
// outbound client profile, and one with an AEAD suite is accepted, with an
// ECDSA key (as the gateway's own) or an RSA key (as many cloud brokers').
// A TLS 1.2 server is refused unless min12.
func TestTLSClientSuites(t *testing.T) {
	ca, _, _ := newCA(t)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	leaf := func(pub, priv any) tls.Certificate {
		t.Helper()
		c, err := signCert(&x509.Certificate{
			Subject:     pkix.Name{CommonName: "broker"},
			DNSNames:    []string{"broker.example"},
			NotBefore:   time.Now().Add(-time.Hour),
			NotAfter:    time.Now().Add(time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}, ca.issuer, pub, ca.key)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{c.Raw, ca.issuer.Raw}, PrivateKey: priv, Leaf: c}
	}
	ecCert, rsaCert := leaf(&ecKey.PublicKey, ecKey), leaf(&rsaKey.PublicKey, rsaKey)
	for _, tc := range []struct {
		name  string
		cert  tls.Certificate
		suite uint16
		min12 bool
		ok    bool
	}{
		{"ecdsa cbc", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, true, false},
		{"ecdsa cbc 256", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA, true, false},
		{"rsa cbc", rsaCert, tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, true, false},
		{"rsa key exchange", rsaCert, tls.TLS_RSA_WITH_AES_128_GCM_SHA256, true, false},
		{"ecdsa gcm", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, true, true},
		{"ecdsa chacha20", ecCert, tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305, true, true},
		{"rsa gcm", rsaCert, tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, true, true},
		{"rsa gcm 256", rsaCert, tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, true, true},
		{"rsa chacha20", rsaCert, tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305, true, true},
		{"tls 1.2 without min12", ecCert, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := handshake12(t, tc.cert, tc.suite, TLSClient(ca.RootPool(), "broker.example", tc.min12))
			if tc.ok && err != nil {
				t.Errorf("handshake with a TLS 1.2 server offering only %s: %v", tls.CipherSuiteName(tc.suite), err)
			}
			if !tc.ok && err == nil {
				t.Errorf("handshake with a TLS 1.2 server offering only %s succeeded; want it refused", tls.CipherSuiteName(tc.suite))
			}
		})
	}
}

// handshake12 runs client against a TLS 1.2 server on loopback that has
// cert and only suite, and returns the client's handshake error.
func handshake12(t *testing.T, cert tls.Certificate, suite uint16, client *tls.Config) error {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		MaxVersion:   tls.VersionTLS12,
		CipherSuites: []uint16{suite},
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
			c.Read(make([]byte, 1)) // until the client closes
		}
	}()
	defer func() { <-done }()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := tls.Client(raw, client)
	err = c.Handshake()
	if err == nil && c.ConnectionState().CipherSuite != suite {
		t.Errorf("negotiated %s, want %s", tls.CipherSuiteName(c.ConnectionState().CipherSuite), tls.CipherSuiteName(suite))
	}
	return err
}

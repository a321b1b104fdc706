package devicesim

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/pki/est"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// HTTPSRun is what PairCodeHTTPS sent, for tests that replay it.
type HTTPSRun struct {
	Hello, Round2, Enroll []byte
}

// HTTPSOptions adjust PairCodeHTTPS.
type HTTPSOptions struct {
	// Run, if set, receives the request bodies sent.
	Run *HTTPSRun
	// Tamper, if set, may alter each answer's body before the device
	// reads it (tests: a tampered answer must be refused).
	Tamper func(path string, body []byte) []byte
}

// PairCodeHTTPS enrolls an MQTT-only device with a setup code over the
// gateway's EST listener (addr, open while the window is): SPAKE2+ in two
// POSTs, then the CSR and the answer sealed with keys from the PAKE and
// bound to the TLS connection (est.PAKEKeys). The device has no CA to
// check the gateway's TLS certificate with; the sealed answer is what
// proves the gateway knew the setup code, and it carries the CA the
// device trusts from then on.
func PairCodeHTTPS(ctx context.Context, addr, id, code string, o HTTPSOptions) (Creds, error) {
	secret, err := pairing.DeriveSetupSecret([]byte(code), id, spake2plus.DefaultKDFParams)
	if err != nil {
		return Creds{}, err
	}
	dev := &pairing.Device{ID: id, Role: pairing.GatewayProver, Verifier: secret.VerifierRecord(), Rand: rand.Reader}
	var peer []*x509.Certificate
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// No trust anchor yet: the certificate is checked after the
		// exchange, against the CA the sealed answer carries, and the
		// seal covers this connection's exporter, so a man in the middle
		// with a certificate of its own breaks it. Until then nothing
		// sent is secret (PAKE messages, a CSR).
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			peer = cs.PeerCertificates
			return nil
		},
	}
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: connect %s (is the gateway's pairing window open? press its button 1-10 s first): %w", id, addr, err)
	}
	tc := conn.(*tls.Conn)
	defer tc.Close()
	stop := context.AfterFunc(ctx, func() { tc.Close() })
	defer stop()
	cs := tc.ConnectionState()
	exporter, err := cs.ExportKeyingMaterial(est.PAKEExporterLabel, nil, est.ExporterSize)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: TLS exporter: %w", id, err)
	}
	// One connection for the whole exchange: the enrollment request's
	// seal names its exporter.
	br := bufio.NewReader(tc)
	post := func(path string, body []byte) ([]byte, error) {
		u := "https://" + addr + path + "?device=" + url.QueryEscape(id)
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Content-Type", "application/octet-stream")
		if err := req.Write(tc); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, est.MaxSealed+1))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("%s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
		}
		if o.Tamper != nil {
			b = o.Tamper(path, b)
		}
		return b, nil
	}
	hello, err := dev.Hello()
	if err != nil {
		return Creds{}, err
	}
	r1, err := post(est.PathPAKE, hello)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: hello: %w", id, err)
	}
	round2, err := dev.Round1(r1)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: round 1: %w", id, err)
	}
	r2, err := post(est.PathPAKE, round2)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: round 2: %w", id, err)
	}
	_, psk, _, err := dev.Done(r2)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: the gateway did not prove the setup code: %w", id, err)
	}
	keys, err := est.NewPAKEKeys(psk)
	if err != nil {
		return Creds{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Creds{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return Creds{}, err
	}
	sealed, err := keys.SealEnroll(exporter, csr)
	if err != nil {
		return Creds{}, err
	}
	if o.Run != nil {
		o.Run.Hello, o.Run.Round2, o.Run.Enroll = hello, round2, sealed
	}
	ans, err := post(est.PathPAKEEnroll, sealed)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: enroll: %w", id, err)
	}
	certDER, caDER, err := keys.OpenIssued(exporter, csr, ans)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s over https: the answer is not the gateway's: %w", id, err)
	}
	return credsFromIssued(key, certDER, caDER, peer)
}

// credsFromIssued checks the authenticated answer: a certificate for the
// device's key under the CA chain sent with it, and a TLS certificate of
// the gateway under that CA too.
func credsFromIssued(key *ecdsa.PrivateKey, certDER, caDER []byte, peer []*x509.Certificate) (Creds, error) {
	certs, err := est.ParseCertsOnly(certDER)
	if err != nil || len(certs) == 0 {
		return Creds{}, fmt.Errorf("issued certificate: %w", errors.Join(errors.New("no certificate"), err))
	}
	chain, err := est.ParseCertsOnly(caDER)
	if err != nil || len(chain) == 0 {
		return Creds{}, fmt.Errorf("CA chain: %w", errors.Join(errors.New("no certificate"), err))
	}
	leaf := certs[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return Creds{}, errors.New("issued certificate is not for this device's key")
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range chain {
		if c.CheckSignatureFrom(c) == nil {
			roots.AddCert(c)
		} else {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return Creds{}, fmt.Errorf("issued certificate does not chain to the CA sent with it: %w", err)
	}
	if len(peer) == 0 {
		return Creds{}, errors.New("the gateway showed no TLS certificate")
	}
	for _, c := range peer[1:] {
		inter.AddCert(c)
	}
	if _, err := peer[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return Creds{}, fmt.Errorf("the gateway's TLS certificate does not chain to the CA it sent: %w", err)
	}
	return certCreds(key, leaf, chain)
}

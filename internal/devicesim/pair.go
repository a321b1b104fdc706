package devicesim

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/gateway/button"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

// DialPSK opens a DTLS-PSK CoAP session with an explicit identity and key
// (the pairing sessions; operational PSK devices use DialCoAP).
func DialPSK(ctx context.Context, addr, identity string, key []byte) (*CoAP, error) {
	d := &Device{Creds: Creds{ID: identity}}
	cfg := &piondtls.Config{
		ExtendedMasterSecret:  piondtls.RequireExtendedMasterSecret,
		ConnectionIDGenerator: piondtls.OnlySendCIDGenerator(),
		PSK:                   func([]byte) ([]byte, error) { return key, nil },
		PSKIdentityHint:       []byte(identity),
		CipherSuites:          pki.DTLSPSKSuites,
	}
	return d.dialWith(ctx, addr, cfg)
}

// PAKERun is the device side of a setup-code exchange, exposed so tests
// can replay its messages.
type PAKERun struct {
	Hello, Round2 []byte // the requests sent
}

// PairOptions adjust PairCode.
type PairOptions struct {
	// Run, if set, receives the PAKE messages sent (tests replay them).
	Run *PAKERun
	// PSK asks for an operational PSK instead of a certificate (a device
	// that cannot do ECDSA).
	PSK bool
}

// PairCode enrolls with a setup code: SPAKE2+ in a PAKE session on the
// gateway's PSK listener (pskAddr), then EST /sen (or the PSK resource)
// in the session keyed with the PAKE's result. The code never travels.
func PairCode(ctx context.Context, pskAddr, id, code string, o PairOptions) (Creds, error) {
	run := o.Run
	secret, err := pairing.DeriveSetupSecret([]byte(code), id, spake2plus.DefaultKDFParams)
	if err != nil {
		return Creds{}, err
	}
	dev := &pairing.Device{ID: id, Role: pairing.GatewayProver, Verifier: secret.VerifierRecord(), Rand: rand.Reader}
	s, err := DialPSK(ctx, pskAddr, pairing.PAKEIdentityPrefix+id, pairing.PublicPAKEPSK(id))
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s: pake session refused (is the gateway's pairing window open? press its button 1-10 s first): %w", id, err)
	}
	defer s.Close()
	hello, err := dev.Hello()
	if err != nil {
		return Creds{}, err
	}
	r1, err := s.Do(ctx, codes.POST, coap.PAKEPath, hello, int(message.AppOctets))
	if err != nil || r1.Code != codes.Changed {
		return Creds{}, fmt.Errorf("pair %s: hello: %v %s %w", id, r1.Code, r1.Payload, err)
	}
	round2, err := dev.Round1(r1.Payload)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s: round 1: %w", id, err)
	}
	if run != nil {
		run.Hello, run.Round2 = hello, round2
	}
	r2, err := s.Do(ctx, codes.POST, coap.PAKEPath, round2, int(message.AppOctets))
	if err != nil || r2.Code != codes.Changed {
		return Creds{}, fmt.Errorf("pair %s: round 2: %v %s %w", id, r2.Code, r2.Payload, err)
	}
	pskID, psk, _, err := dev.Done(r2.Payload)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s: the gateway did not prove the setup code: %w", id, err)
	}
	s.Close()
	es, err := DialPSK(ctx, pskAddr, pskID, psk)
	if err != nil {
		return Creds{}, fmt.Errorf("pair %s: enrollment session: %w", id, err)
	}
	defer es.Close()
	if o.PSK {
		return es.enrollPSK(ctx, pskAddr)
	}
	return es.EnrollEST(ctx)
}

// enrollPSK asks for an operational PSK inside the enrollment session.
func (c *CoAP) enrollPSK(ctx context.Context, pskAddr string) (Creds, error) {
	r, err := c.Do(ctx, codes.POST, coap.PSKPath, nil, -1)
	if err != nil || r.Code != codes.Changed {
		return Creds{}, fmt.Errorf("psk enrollment: %v %s %w", r.Code, r.Payload, err)
	}
	var a struct {
		ID          string `json:"id"`
		PSKIdentity string `json:"psk_identity"`
		PSK         string `json:"psk"`
	}
	if err := json.Unmarshal(r.Payload, &a); err != nil || a.ID == "" || a.PSKIdentity == "" || a.PSK == "" {
		return Creds{}, fmt.Errorf("psk enrollment answer %q: %v", r.Payload, err)
	}
	_, port, _ := net.SplitHostPort(pskAddr)
	p, _ := strconv.Atoi(port)
	return Creds{ID: a.ID, Name: a.ID, Auth: "psk", PSKIdentity: a.PSKIdentity, PSK: a.PSK, CoAPSPort: p}, nil
}

// PairIDevID enrolls with a manufacturer certificate on the gateway's
// certificate listener. roots verify the gateway (its root, obtained out
// of band: a device that has none would need RFC 7030's bootstrap trust,
// which is not offered).
func PairIDevID(ctx context.Context, certAddr string, idevid tls.Certificate, roots *x509.CertPool) (Creds, error) {
	s, err := DialIDevID(ctx, certAddr, idevid, roots)
	if err != nil {
		return Creds{}, err
	}
	defer s.Close()
	return s.EnrollEST(ctx)
}

// DialIDevID opens the enrollment session of PairIDevID.
func DialIDevID(ctx context.Context, certAddr string, idevid tls.Certificate, roots *x509.CertPool) (*CoAP, error) {
	d := &Device{Creds: Creds{ID: "idevid"}, Roots: roots}
	cfg := &piondtls.Config{
		ExtendedMasterSecret:  piondtls.RequireExtendedMasterSecret,
		ConnectionIDGenerator: piondtls.OnlySendCIDGenerator(),
		Certificates:          []tls.Certificate{idevid},
		RootCAs:               roots,
		ServerName:            d.serverName(certAddr),
		CipherSuites:          pki.DTLSCertSuites,
	}
	s, err := d.dialWith(ctx, certAddr, cfg)
	if err != nil {
		return nil, fmt.Errorf("pair with idevid: refused (is the gateway's pairing window open, and the vendor's root in pairing.vendors?): %w", err)
	}
	return s, nil
}

// EnrollEST makes a key, runs /sen, then /crts, inside an enrollment
// session.
func (c *CoAP) EnrollEST(ctx context.Context) (Creds, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Creds{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return Creds{}, err
	}
	r, err := c.Do(ctx, codes.POST, est.PathSen, csr, est.FormatPKCS10)
	if err != nil || r.Code != codes.Changed {
		return Creds{}, fmt.Errorf("est /sen: %v %s %w", r.Code, r.Payload, err)
	}
	cert, err := x509.ParseCertificate(r.Payload)
	if err != nil {
		return Creds{}, fmt.Errorf("est /sen answer: %w", err)
	}
	r, err = c.Do(ctx, codes.GET, est.PathCrts, nil, -1)
	if err != nil || r.Code != codes.Content {
		return Creds{}, fmt.Errorf("est /crts: %v %s %w", r.Code, r.Payload, err)
	}
	chain, err := est.ParseCertsOnly(r.Payload)
	if err != nil {
		return Creds{}, err
	}
	return certCreds(key, cert, chain)
}

// certCreds are the credentials of an enrolled certificate device: its
// key, the certificate the gateway issued and the CA chain it sent.
func certCreds(key *ecdsa.PrivateKey, cert *x509.Certificate, chain []*x509.Certificate) (Creds, error) {
	id, err := pki.DeviceIDOf(cert)
	if err != nil {
		return Creds{}, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return Creds{}, err
	}
	var caPEM []byte
	for _, ca := range chain {
		caPEM = append(caPEM, pki.CertPEM(ca)...)
	}
	return Creds{ID: id, Name: id, Auth: "cert", CertPEM: string(pki.CertPEM(cert)), CAPEM: string(caPEM),
		KeyPEM: string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))}, nil
}

// PressButton writes one press of the given hold time to a FIFO (or any
// file) as the kernel's evdev would: key down, SYN, key up, SYN, with
// timestamps hold apart. The gateway measures the hold from them.
func PressButton(path string, hold time.Duration, code uint16) error {
	l := button.NativeLayout()
	t0 := time.Duration(time.Now().UnixMicro()) * time.Microsecond
	var b []byte
	for _, e := range []button.InputEvent{
		{Time: t0, Type: button.EvKey, Code: code, Value: 1},
		{Time: t0, Type: button.EvSyn, Code: button.SynReport},
		{Time: t0 + hold, Type: button.EvKey, Code: code, Value: 0},
		{Time: t0 + hold, Type: button.EvSyn, Code: button.SynReport},
	} {
		b = button.AppendInputEvent(b, e, l)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("press button: open %s: %w", path, err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		return fmt.Errorf("press button: write %s: %w", path, err)
	}
	return nil
}

// PairIDevIDHTTPS enrolls an MQTT-only device over EST on HTTPS (RFC 7030
// simpleenroll and cacerts) with its manufacturer certificate as the TLS
// client certificate. baseURL is https://host:port of pairing.est_listen.
func PairIDevIDHTTPS(ctx context.Context, baseURL string, idevid tls.Certificate, roots *x509.CertPool) (Creds, error) {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{idevid},
		MinVersion: tls.VersionTLS12}}, Timeout: 20 * time.Second}
	defer hc.CloseIdleConnections()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Creds{}, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return Creds{}, err
	}
	call := func(method, path string, body []byte) ([]byte, error) {
		req, err := http.NewRequestWithContext(ctx, method, baseURL+path, strings.NewReader(base64.StdEncoding.EncodeToString(body)))
		if err != nil {
			return nil, err
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/pkcs10")
			req.Header.Set("Content-Transfer-Encoding", "base64")
		}
		resp, err := hc.Do(req)
		if err != nil {
			return nil, fmt.Errorf("est %s: %w", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("est %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
		}
		return base64.StdEncoding.DecodeString(string(b))
	}
	// cacerts first (RFC 7030 4.1): the listener closes with the window,
	// which the enrollment closes.
	der, err := call("GET", "/.well-known/est/cacerts", nil)
	if err != nil {
		return Creds{}, err
	}
	chain, err := est.ParseCertsOnly(der)
	if err != nil {
		return Creds{}, err
	}
	der, err = call("POST", "/.well-known/est/simpleenroll", csr)
	if err != nil {
		return Creds{}, err
	}
	certs, err := est.ParseCertsOnly(der)
	if err != nil {
		return Creds{}, err
	}
	return certCreds(key, certs[0], chain)
}

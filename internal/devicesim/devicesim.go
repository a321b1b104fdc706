// Package devicesim is a simulated constrained device: it speaks CoAP over
// DTLS (PSK or certificate) and MQTT 5 over TLS (client certificate or
// secret) to a Bastion gateway with the credentials `bastionctl --json
// device add` prints. cmd/devicesim, the tests and the benchmarks use it.
// It is a client only: it never listens.
package devicesim

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	piondtls "github.com/pion/dtls/v3"

	"github.com/bastion-iot/bastion/pki"
)

// Creds are the device credentials as bastionctl --json device add prints
// them, plus the device's own private key for certificate devices (the
// gateway never sees it).
type Creds struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	Auth        string `json:"auth"` // psk, cert or secret
	PSKIdentity string `json:"psk_identity,omitempty"`
	PSK         string `json:"psk,omitempty"` // hex
	CoAPSPort   int    `json:"coaps_port,omitempty"`
	CertPEM     string `json:"cert_pem,omitempty"`
	CAPEM       string `json:"ca_pem,omitempty"`
	Secret      string `json:"secret,omitempty"`
	KeyPEM      string `json:"key_pem,omitempty"`
}

// LoadCreds reads a credentials file; keyFile (optional) holds the
// certificate device's private key in PEM.
func LoadCreds(path, keyFile string) (Creds, error) {
	var c Creds
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("read credentials: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("credentials %s: not the JSON bastionctl --json device add prints: %w", path, err)
	}
	if keyFile != "" {
		k, err := os.ReadFile(keyFile)
		if err != nil {
			return c, fmt.Errorf("read device key: %w", err)
		}
		c.KeyPEM = string(k)
	}
	if c.ID == "" {
		return c, fmt.Errorf("credentials %s: no device id", path)
	}
	return c, nil
}

// NewKey makes a device key pair and a CSR for `bastionctl device add
// --auth cert --csr`.
func NewKey() (keyPEM, csrPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "devicesim"}}, key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// Device is one simulated device: its credentials and where the gateway is.
type Device struct {
	Creds
	// Roots verify the gateway; nil uses CAPEM from the credentials.
	Roots *x509.CertPool
	// ServerName is checked in the gateway's certificate (default: the
	// host of the address dialled).
	ServerName string
	// PacketWrites makes the MQTT session write each packet with one
	// Write, so one TLS record, as most MQTT clients (paho.mqtt.c,
	// mosquitto_pub, embedded stacks) do; by default paho.golang writes a
	// PUBLISH in several (fixed header, topic, properties, payload).
	PacketWrites bool
}

func (d *Device) roots() (*x509.CertPool, error) {
	if d.Roots != nil {
		return d.Roots, nil
	}
	p := x509.NewCertPool()
	if d.CAPEM == "" || !p.AppendCertsFromPEM([]byte(d.CAPEM)) {
		return nil, errors.New("no CA to verify the gateway: give --ca ROOT.pem or credentials with ca_pem")
	}
	return p, nil
}

func (d *Device) certificate() (tls.Certificate, error) {
	if d.CertPEM == "" || d.KeyPEM == "" {
		return tls.Certificate{}, fmt.Errorf("device %s: certificate mode needs cert_pem and the device key (--key)", d.ID)
	}
	return tls.X509KeyPair([]byte(d.CertPEM), []byte(d.KeyPEM))
}

func (d *Device) serverName(addr string) string {
	if d.ServerName != "" {
		return d.ServerName
	}
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

// DTLSConfig is the client side of the gateway's DTLS profile.
func (d *Device) DTLSConfig(addr string) (*piondtls.Config, error) {
	c := &piondtls.Config{
		ExtendedMasterSecret:  piondtls.RequireExtendedMasterSecret,
		ConnectionIDGenerator: piondtls.OnlySendCIDGenerator(),
	}
	switch d.Auth {
	case "psk":
		key, err := hex.DecodeString(d.PSK)
		if err != nil || len(key) == 0 {
			return nil, fmt.Errorf("device %s: psk is not hex", d.ID)
		}
		c.PSK = func([]byte) ([]byte, error) { return key, nil }
		c.PSKIdentityHint = []byte(d.PSKIdentity)
		c.CipherSuites = pki.DTLSPSKSuites
	case "cert":
		cert, err := d.certificate()
		if err != nil {
			return nil, err
		}
		roots, err := d.roots()
		if err != nil {
			return nil, err
		}
		c.Certificates = []tls.Certificate{cert}
		c.RootCAs = roots
		c.ServerName = d.serverName(addr)
		c.CipherSuites = pki.DTLSCertSuites
	default:
		return nil, fmt.Errorf("device %s: CoAP needs psk or cert credentials, not %q", d.ID, d.Auth)
	}
	return c, nil
}

// TLSConfig is the client side of the gateway's MQTT TLS listener.
func (d *Device) TLSConfig(addr string) (*tls.Config, error) {
	roots, err := d.roots()
	if err != nil {
		return nil, err
	}
	c := &tls.Config{RootCAs: roots, ServerName: d.serverName(addr), MinVersion: tls.VersionTLS12}
	if d.Auth == "cert" {
		cert, err := d.certificate()
		if err != nil {
			return nil, err
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// CoAPAddr picks the CoAPS address: the PSK port from the credentials for
// PSK devices on host, else def.
func (d *Device) CoAPAddr(host, def string) string {
	if d.Auth == "psk" && d.CoAPSPort != 0 {
		return net.JoinHostPort(host, strconv.Itoa(d.CoAPSPort))
	}
	return def
}

// Signer returns the device key (for callers that need it).
func (d *Device) Signer() (crypto.Signer, error) {
	cert, err := d.certificate()
	if err != nil {
		return nil, err
	}
	s, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("device key cannot sign")
	}
	return s, nil
}

package devicesim

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
	"github.com/bastion-iot/bastion/pki/est"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

const (
	hostileCode = "ABCD-EFGH-2345"
	hostileDev  = "acme-h1"
)

// issueFunc is what a fake gateway answers to the device's CSR: the
// device's certificate and the CA chain it claims. It runs on the
// server's goroutine: it returns errors, never calls t.Fatal.
type issueFunc func(csr *x509.CertificateRequest) (cert *x509.Certificate, chain []*x509.Certificate, err error)

// fakeGateway is a gateway that knows the device's setup code: it runs
// the gateway's side of SPAKE2+ as the prover and seals its answer with
// the right keys on the right connection, so whatever it answers passes
// the MAC and only the device's own checks (credsFromIssued) stand
// between it and the device. Its TLS certificate is issued by tlsCA.
func fakeGateway(t *testing.T, tlsCA *testpki.CA, issue issueFunc) string {
	t.Helper()
	secret, err := pairing.DeriveSetupSecret([]byte(hostileCode), hostileDev, spake2plus.DefaultKDFParams)
	if err != nil {
		t.Fatal(err)
	}
	const gwID = "gw-hostile"
	var (
		mu     sync.Mutex
		prover *spake2plus.Prover
		psk    []byte
	)
	mux := http.NewServeMux()
	mux.HandleFunc(est.PathPAKE, func(w http.ResponseWriter, r *http.Request) {
		var m pairing.PAKEMessage
		if err := m.UnmarshalBinary(readAll(t, r)); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		var reply pairing.PAKEMessage
		switch m.Type {
		case pairing.MsgHello:
			ctx := pairing.SPAKEContext(pairing.GatewayProver, gwID, string(m.ID))
			reply = pairing.PAKEMessage{Type: pairing.MsgRound1, ID: []byte(gwID)}
			prover, reply.Share, err = spake2plus.NewProver(ctx, secret, rand.Reader)
		case pairing.MsgRound2:
			var key []byte
			reply = pairing.PAKEMessage{Type: pairing.MsgDone}
			reply.Confirm, key, err = prover.Finish(m.Share, m.Confirm)
			if err == nil {
				_, psk, err = pairing.EnrollmentPSK(key, hostileDev)
			}
		}
		var out []byte
		if err == nil {
			out, err = reply.MarshalBinary()
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		w.Write(out)
	})
	mux.HandleFunc(est.PathPAKEEnroll, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		keys, err := est.NewPAKEKeys(psk)
		mu.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		exporter, err := r.TLS.ExportKeyingMaterial(est.PAKEExporterLabel, nil, est.ExporterSize)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		csrDER, err := keys.OpenEnroll(exporter, readAll(t, r))
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		csr, err := x509.ParseCertificateRequest(csrDER)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		cert, chain, err := issue(csr)
		if err != nil {
			t.Errorf("fake gateway: issue: %v", err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		certDER, err := est.EncodeCertsOnly([]*x509.Certificate{cert})
		if err != nil {
			t.Error(err)
			return
		}
		caDER, err := est.EncodeCertsOnly(chain)
		if err != nil {
			t.Error(err)
			return
		}
		body, err := keys.SealIssued(exporter, csrDER, certDER, caDER)
		if err != nil {
			t.Error(err)
			return
		}
		w.Write(body)
	})
	srv := httptest.NewUnstartedServer(mux)
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{tlsCA.Server(t, "gateway", "127.0.0.1").TLS}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

func readAll(t *testing.T, r *http.Request) []byte {
	b, err := io.ReadAll(io.LimitReader(r.Body, est.MaxSealed))
	if err != nil {
		t.Errorf("read %s: %v", r.URL.Path, err)
	}
	return b
}

// deviceCert issues, under ca, a device certificate for pub naming the
// test's device, as the gateway's CA would.
func deviceCert(ca *testpki.CA, pub any) (*x509.Certificate, error) {
	u, err := url.Parse(pki.DeviceURIPrefix + hostileDev)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: hostileDev},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func pairHostile(t *testing.T, addr string) (Creds, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return PairCodeHTTPS(ctx, addr, hostileDev, hostileCode, HTTPSOptions{})
}

// The fake gateway, answering as a real one does, is accepted: the
// refusals below are the device's checks, not a broken fake.
func TestPairCodeHTTPSHonestFake(t *testing.T) {
	gwCA := testpki.New(t, t.TempDir(), "gateway")
	addr := fakeGateway(t, gwCA, func(csr *x509.CertificateRequest) (*x509.Certificate, []*x509.Certificate, error) {
		c, err := deviceCert(gwCA, csr.PublicKey)
		return c, []*x509.Certificate{gwCA.Cert}, err
	})
	c, err := pairHostile(t, addr)
	if err != nil {
		t.Fatalf("pair with an honest gateway: %v", err)
	}
	if c.ID != hostileDev || !strings.Contains(c.CAPEM, "CERTIFICATE") {
		t.Errorf("creds = id %q, CA %q", c.ID, c.CAPEM)
	}
}

// A gateway that knows the code but issues a certificate for a key of its
// own (one whose private key it keeps) is refused.
func TestPairCodeHTTPSRefusesCertForAnotherKey(t *testing.T) {
	gwCA := testpki.New(t, t.TempDir(), "gateway")
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	addr := fakeGateway(t, gwCA, func(*x509.CertificateRequest) (*x509.Certificate, []*x509.Certificate, error) {
		c, err := deviceCert(gwCA, &other.PublicKey)
		return c, []*x509.Certificate{gwCA.Cert}, err
	})
	_, err = pairHostile(t, addr)
	if err == nil || !strings.Contains(err.Error(), "not for this device's key") {
		t.Fatalf("certificate for another key: err = %v, want refused as not for this device's key", err)
	}
}

// A gateway that knows the code but sends a CA chain that did not issue
// the device's certificate is refused.
func TestPairCodeHTTPSRefusesCertNotUnderSentCA(t *testing.T) {
	gwCA := testpki.New(t, t.TempDir(), "gateway")
	other := testpki.New(t, t.TempDir(), "other")
	addr := fakeGateway(t, gwCA, func(csr *x509.CertificateRequest) (*x509.Certificate, []*x509.Certificate, error) {
		c, err := deviceCert(other, csr.PublicKey)
		return c, []*x509.Certificate{gwCA.Cert}, err
	})
	_, err := pairHostile(t, addr)
	if err == nil || !strings.Contains(err.Error(), "does not chain to the CA sent with it") {
		t.Fatalf("certificate under another CA: err = %v, want refused as not chaining to the CA sent", err)
	}
}

// A gateway that knows the code but sends a CA (its own, which issued the
// device's certificate) that did not issue its TLS certificate is
// refused: the device would trust a CA the gateway it talks to is not
// under.
func TestPairCodeHTTPSRefusesCANotMatchingTLS(t *testing.T) {
	gwCA := testpki.New(t, t.TempDir(), "gateway")
	other := testpki.New(t, t.TempDir(), "other")
	addr := fakeGateway(t, gwCA, func(csr *x509.CertificateRequest) (*x509.Certificate, []*x509.Certificate, error) {
		c, err := deviceCert(other, csr.PublicKey)
		return c, []*x509.Certificate{other.Cert}, err
	})
	_, err := pairHostile(t, addr)
	if err == nil || !strings.Contains(err.Error(), "TLS certificate does not chain to the CA it sent") {
		t.Fatalf("CA not the TLS certificate's: err = %v, want refused as the TLS certificate not chaining to it", err)
	}
}

package otacache

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/mux"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"github.com/bastion-iot/bastion/internal/testenv"
)

var testPSKs = map[string]string{"dev-a": "secret-key-of-dev-a", "dev-b": "secret-key-of-dev-b"}

// pskIdentity is how a gateway learns who is on a DTLS session: the PSK
// identity the handshake authenticated.
// ServeDTLS's OnNewConn learns it once per session (as bridges/coap does)
// and keeps it with SetValue.
func pskIdentity(w *DTLSResponseWriter) (string, bool) {
	id, ok := w.Session().Value().(string)
	return id, ok
}

func learnIdentity(c *DTLSConn) {
	if id, ok := sessionIdentity(c.NetConn()); ok {
		c.SetValue(id)
	}
}

func sessionIdentity(nc net.Conn) (string, bool) {
	dc, ok := nc.(*piondtls.Conn)
	if !ok {
		return "", false
	}
	st, ok := dc.ConnectionState()
	if !ok || len(st.IdentityHint) == 0 {
		return "", false
	}
	return string(st.IdentityHint), true
}

func pskConfig(lookup func(id string) ([]byte, bool)) *piondtls.Config {
	return &piondtls.Config{
		PSK: func(hint []byte) ([]byte, error) {
			k, ok := lookup(string(hint))
			if !ok {
				return nil, fmt.Errorf("unknown PSK identity %q", hint)
			}
			return k, nil
		},
		PSKIdentityHint: []byte("bastion"),
		CipherSuites:    []piondtls.CipherSuiteID{piondtls.TLS_PSK_WITH_AES_128_CCM_8, piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256},
	}
}

// startCoAPS runs a go-coap DTLS server on 127.0.0.1:0 with block-wise
// transfer on, routing /fw/ to ServeCoAP and /fw-status to ServeCoAPStatus
// with the PSK identity as the device. It is what bridges/coap will do.
func startCoAPS(t testing.TB, c *Cache) string {
	return startCoAPSWith(t, c, "127.0.0.1:0", func(id string) ([]byte, bool) {
		k, ok := testPSKs[id]
		return []byte(k), ok
	})
}

func startCoAPSWith(t testing.TB, c *Cache, addr string, psk func(id string) ([]byte, bool)) string {
	t.Helper()
	l, err := coapnet.NewDTLSListener("udp", addr, pskConfig(psk))
	if err != nil {
		t.Fatal(err)
	}
	// As bridges/coap serves them: on the listener's read loop (Inline),
	// with a status report, which waits for the store, answered from a
	// goroutine of its own (Defer).
	var reports sync.WaitGroup
	h := func(w *DTLSResponseWriter, pm *pool.Message) {
		m := &mux.Message{Message: pm, RouteParams: new(mux.RouteParams)}
		dev, ok := pskIdentity(w)
		if !ok {
			_ = w.SetResponse(codes.Unauthorized, message.TextPlain, nil)
			return
		}
		if isStatusPath(pm.Options()) {
			d := w.Defer()
			reports.Add(1)
			go func() {
				defer reports.Done()
				c.ServeCoAPStatus(w, m, dev)
				d.Done()
			}()
			return
		}
		c.ServeCoAP(w, m, dev)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = ServeDTLS(ctx, l, DTLSServeConfig{Handler: h, OnNewConn: learnIdentity, HandshakeTimeout: 30 * time.Second,
			Inline: func(*DTLSConn) bool { return true }})
	}()
	t.Cleanup(func() { cancel(); l.Close(); wg.Wait(); reports.Wait() })
	return l.Addr().String()
}

// isStatusPath reports whether opts' Uri-Path is /fw-status, as
// bridges/coap routes: from the options, without building the path (which
// the firmware benchmark would otherwise count for every block).
func isStatusPath(opts message.Options) bool {
	n, status := 0, false
	for _, o := range opts {
		if o.ID == message.URIPath {
			n++
			status = string(o.Value) == "fw-status"
		}
	}
	return n == 1 && status
}

// stoppableRunner replaces go-coap's default periodic runner (a goroutine
// sleeping 4s at a time) with one that ends when the test does.
func stoppableRunner(t testing.TB) periodic.Func {
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	return periodic.New(stop, time.Second)
}

func dialDevice(t testing.TB, addr, id string) *udpclient.Conn {
	return dialDeviceKey(t, addr, id, []byte(testPSKs[id]))
}

func dialDeviceKey(t testing.TB, addr, id string, key []byte, suites ...piondtls.CipherSuiteID) *udpclient.Conn {
	t.Helper()
	cfg := pskConfig(func(string) ([]byte, bool) { return key, true })
	if len(suites) > 0 {
		cfg.CipherSuites = suites
	}
	cfg.PSKIdentityHint = []byte(id)
	co, err := dtls.Dial(addr, cfg, options.WithBlockwise(false, blockwise.SZX1024, time.Minute),
		options.WithErrors(func(error) {}), options.WithPeriodicRunner(stoppableRunner(t)))
	if err != nil {
		t.Fatalf("dial %s as %s: %v", addr, id, err)
	}
	t.Cleanup(func() { co.Close(); <-co.Done() })
	return co
}

// servingFixture: one good check with a class-A image of 50.5 blocks.
func servingFixture(t *testing.T) (*fixture, []byte, Offer) {
	f := newFixture(t)
	img := testImage(50*1024+512, 40)
	f.repo.addImage(classA, "1.1.0", 1, img)
	f.repo.addImage(classB, "2.1", 1, testImage(3000, 41))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	o, ok := c.Offer("dev-a")
	if !ok {
		t.Fatal("no offer for dev-a")
	}
	return f, img, o
}

func TestCoAPSLibcoapBlockwise(t *testing.T) {
	client := testenv.RequireCommand(t, "coap-client-openssl")
	f, img, o := servingFixture(t)
	addr := startCoAPS(t, f.cache)
	_, port, _ := net.SplitHostPort(addr)
	run := func(t *testing.T, id, block, path string, extra ...string) ([]byte, string) {
		t.Helper()
		out := filepath.Join(t.TempDir(), "out")
		args := append([]string{"-B", "20", "-b", block, "-k", testPSKs[id], "-u", id, "-o", out}, extra...)
		args = append(args, "coaps://127.0.0.1:"+port+path)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if os.Getenv("OTACACHE_DEBUG_COAP") != "" {
			args = append([]string{"-v", "7"}, args...)
		}
		msg, _ := exec.CommandContext(ctx, client, args...).CombinedOutput()
		got, _ := os.ReadFile(out)
		return got, string(msg)
	}
	t.Run("whole image by sha256", func(t *testing.T) {
		got, msg := run(t, "dev-a", "1024", o.Path)
		if sha256.Sum256(got) != sha256.Sum256(img) {
			t.Fatalf("libcoap got %d bytes, want %d with the offered hash; output: %s", len(got), len(img), msg)
		}
	})
	t.Run("by class, 256-byte blocks", func(t *testing.T) {
		got, msg := run(t, "dev-a", "256", "/fw/acme/th-10")
		if !bytes.Equal(got, img) {
			t.Fatalf("libcoap got %d bytes, want %d; output: %s", len(got), len(img), msg)
		}
	})
	// libcoap asked to start at block N fetches exactly block N (it leaves
	// the rest to the application): each answer must be that slice of the
	// image, from a server that never saw this transfer before.
	for _, n := range []int{37, 1, 50} {
		t.Run(fmt.Sprintf("resume at block %d", n), func(t *testing.T) {
			got, msg := run(t, "dev-a", fmt.Sprintf("%d,1024", n), o.Path)
			want := img[n*1024 : min((n+1)*1024, len(img))]
			if !bytes.Equal(got, want) {
				t.Fatalf("libcoap block %d: got %d bytes, want %d bytes of the image; output: %s", n, len(got), len(want), msg)
			}
		})
	}
	t.Run("class B device refused", func(t *testing.T) {
		got, msg := run(t, "dev-b", "1024", o.Path)
		if len(got) != 0 || !strings.HasPrefix(msg, "4.03 ") || !strings.Contains(msg, "is for class acme/th-10") {
			t.Fatalf("dev-b fetching class A's image: %d bytes written, output %q; want nothing and 4.03 naming the class", len(got), msg)
		}
	})
	t.Run("PUT refused", func(t *testing.T) {
		got, msg := run(t, "dev-a", "1024", o.Path, "-m", "put", "-e", "replacement")
		if len(got) != 0 || !strings.HasPrefix(msg, "4.05 firmware is download-only") {
			t.Fatalf("PUT: %d bytes written, output %q; want 4.05", len(got), msg)
		}
	})
	t.Run("DELETE refused", func(t *testing.T) {
		got, msg := run(t, "dev-a", "1024", o.Path, "-m", "delete")
		if len(got) != 0 || !strings.HasPrefix(msg, "4.05 ") {
			t.Fatalf("DELETE: %d bytes written, output %q; want 4.05", len(got), msg)
		}
	})
}

func TestCoAPSGoDevice(t *testing.T) {
	f, img, o := servingFixture(t)
	addr := startCoAPS(t, f.cache)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	co := dialDevice(t, addr, "dev-a")

	// Every method but GET: 4.05, nothing of the image in the answer.
	for name, do := range map[string]func() (codes.Code, []byte, error){
		"POST": func() (codes.Code, []byte, error) {
			r, err := co.Post(ctx, o.Path, message.AppOctets, bytes.NewReader([]byte("x")))
			return codeBody(r, err)
		},
		"PUT": func() (codes.Code, []byte, error) {
			r, err := co.Put(ctx, o.Path, message.AppOctets, bytes.NewReader([]byte("x")))
			return codeBody(r, err)
		},
		"DELETE": func() (codes.Code, []byte, error) { r, err := co.Delete(ctx, o.Path); return codeBody(r, err) },
	} {
		code, body, err := do()
		if err != nil || code != codes.MethodNotAllowed || bytes.Contains(body, img[:32]) {
			t.Errorf("%s %s = %v %.60q (%d bytes), %v; want 4.05", name, o.Path, code, body, len(body), err)
		}
	}

	// An interrupted download (half of block 12 written) resumes at block 12.
	dst, err := os.Create(filepath.Join(t.TempDir(), "fw"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if _, err := dst.Write(img[:12*1024+500]); err != nil {
		t.Fatal(err)
	}
	res, err := FetchCoAP(ctx, co, o.Path, dst, 12*1024+500, blockwise.SZX1024, 1<<20)
	if err != nil {
		t.Fatalf("FetchCoAP: %v", err)
	}
	if res.ResumedAt != 12*1024 || res.Size != int64(len(img)) || res.ETag != o.SHA256[:16] {
		t.Errorf("fetch result %+v: want resumed at %d, size %d, etag %s", res, 12*1024, len(img), o.SHA256[:16])
	}
	if _, err := VerifyImage(dst, o, classA, f.repo.vendorKey.Public()); err != nil {
		t.Fatalf("VerifyImage after resumed CoAPS fetch: %v", err)
	}
	if err := ReportStatusCoAP(ctx, co, "/fw-status", DeviceStatus{State: StateVerified, Version: o.Version, SHA256: o.SHA256}); err != nil {
		t.Fatalf("status report: %v", err)
	}
	if st := f.cache.DeviceStatuses()["dev-a"]; st.State != StateVerified || st.SHA256 != o.SHA256 {
		t.Errorf("gateway kept status %+v", st)
	}
	// A report the gateway refuses is answered 4.00 and counted for the
	// metrics; the good one before it was not.
	if n := f.cache.Status().Counters.StatusRefused; n != 0 {
		t.Errorf("StatusRefused = %d after a good report, want 0", n)
	}
	code, _, err := codeBody(co.Post(ctx, "/fw-status", message.AppJSON, strings.NewReader(`{"state":"rebooting"}`)))
	if err != nil || code != codes.BadRequest {
		t.Errorf("bad status report: %v %v, want 4.00", code, err)
	}
	if n := f.cache.Status().Counters.StatusRefused; n != 1 {
		t.Errorf("StatusRefused = %d after a bad report, want 1", n)
	}

	// A device that runs something newer is not served the older image.
	f.devices.set("dev-a", DeviceInfo{Class: classA, Version: "1.2"})
	if _, err := FetchCoAP(ctx, co, o.Path, discardAt{}, 0, blockwise.SZX1024, 1<<20); err == nil || !strings.Contains(err.Error(), "Forbidden") {
		t.Errorf("older image to a device on 1.2: err %v, want 4.03", err)
	}

	// A class-B device gets nothing of class A, by sha256 or by class path.
	cb := dialDevice(t, addr, "dev-b")
	for _, p := range []string{o.Path, "/fw/acme/th-10"} {
		var buf bytes.Buffer
		_, err := FetchCoAP(ctx, cb, p, offsetWriter{&buf}, 0, blockwise.SZX1024, 1<<20)
		if err == nil || !strings.Contains(err.Error(), "Forbidden") || buf.Len() != 0 {
			t.Errorf("dev-b GET %s: err %v, %d bytes; want 4.03 and nothing", p, err, buf.Len())
		}
	}
}

type offsetWriter struct{ w io.Writer }

func (o offsetWriter) WriteAt(p []byte, _ int64) (int, error) { return o.w.Write(p) }

type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func codeBody(r interface {
	Code() codes.Code
	ReadBody() ([]byte, error)
}, err error) (codes.Code, []byte, error) {
	if err != nil {
		return 0, nil, err
	}
	b, _ := r.ReadBody()
	return r.Code(), b, nil
}

// testCA issues the HTTPS listener's client certificates (CN = device).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test device CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

func (ca *testCA) issue(t testing.TB, cn string) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestHTTPSRangeResume(t *testing.T) {
	f, img, o := servingFixture(t)
	ca := newTestCA(t)
	identify := func(r *http.Request) (string, bool) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
			return "", false
		}
		return r.TLS.VerifiedChains[0][0].Subject.CommonName, true
	}
	srv := httptest.NewUnstartedServer(f.cache.HTTPHandler(identify, HTTPLimits{}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool, MinVersion: tls.VersionTLS12}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the no-certificate case below is expected
	srv.StartTLS()
	defer srv.Close()
	clientFor := func(id string) *http.Client {
		tr := srv.Client().Transport.(*http.Transport).Clone()
		tr.TLSClientConfig.Certificates = []tls.Certificate{ca.issue(t, id)}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 30 * time.Second}
	}
	ctx := context.Background()
	hc := clientFor("dev-a")

	dst, err := os.Create(filepath.Join(t.TempDir(), "fw"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	// First attempt is cut off after 20000 bytes (the device's limit here
	// stands in for a dropped link); the second resumes with Range.
	first, err := FetchHTTPS(ctx, hc, srv.URL+o.Path, dst, 0, "", 20000)
	if err == nil || first.Size != 20001 {
		t.Fatalf("first attempt: %+v, %v; want it cut after 20001 bytes", first, err)
	}
	res, err := FetchHTTPS(ctx, hc, srv.URL+o.Path, dst, 20001, first.ETag, 1<<20)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	if res.ResumedAt != 20001 || res.Size != int64(len(img)) || res.ETag != `"`+o.SHA256+`"` {
		t.Errorf("resume result %+v, want ResumedAt 20001, Size %d", res, len(img))
	}
	if _, err := VerifyImage(dst, o, classA, f.repo.vendorKey.Public()); err != nil {
		t.Fatalf("VerifyImage after HTTPS range resume: %v", err)
	}
	// A stale ETag (image changed) gets the whole image, not a mix.
	res, err = FetchHTTPS(ctx, hc, srv.URL+o.Path, discardAt{}, 20001, `"`+strings.Repeat("0", 64)+`"`, 1<<20)
	if err != nil || res.ResumedAt != 0 || res.Size != int64(len(img)) {
		t.Errorf("stale If-Range: %+v, %v; want the whole image from 0", res, err)
	}

	for _, tc := range []struct {
		name, dev, method, path string
		want                    int
	}{
		{"class B by sha", "dev-b", "GET", o.Path, http.StatusForbidden},
		{"class B by class path", "dev-b", "GET", "/fw/acme/th-10", http.StatusForbidden},
		{"unknown device", "dev-x", "GET", o.Path, http.StatusForbidden},
		{"POST", "dev-a", "POST", o.Path, http.StatusMethodNotAllowed},
		{"PUT", "dev-a", "PUT", o.Path, http.StatusMethodNotAllowed},
		{"DELETE", "dev-a", "DELETE", o.Path, http.StatusMethodNotAllowed},
		{"HEAD", "dev-a", "HEAD", o.Path, http.StatusMethodNotAllowed},
		{"traversal", "dev-a", "GET", "/fw/sha256/../../images", http.StatusNotFound},
		{"unknown sha", "dev-a", "GET", "/fw/sha256/" + strings.Repeat("ab", 32), http.StatusNotFound},
	} {
		req, _ := http.NewRequestWithContext(ctx, tc.method, srv.URL+tc.path, strings.NewReader("x"))
		resp, err := clientFor(tc.dev).Do(req)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want || bytes.Contains(body, img[:32]) {
			t.Errorf("%s: %s %s as %s = %d %.60q, want %d and no image bytes", tc.name, tc.method, tc.path, tc.dev, resp.StatusCode, body, tc.want)
		}
	}
	// Without a client certificate the TLS handshake itself fails.
	if _, err := srv.Client().Get(srv.URL + o.Path); err == nil {
		t.Error("request without a client certificate succeeded")
	}
}

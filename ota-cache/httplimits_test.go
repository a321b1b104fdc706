package otacache

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// smallBuffers keeps the socket buffers between a test's HTTPS server and
// its clients small, so that a client that stops reading stops the
// server's writes after a few tens of KiB instead of megabytes.
const smallBuffers = 16 << 10

type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(smallBuffers)
	}
	return c, err
}

// limitsServer is HTTPHandler on an HTTPS server with client certificates
// (CN = device) whose identify also refuses the devices in revoked. done
// gets one value per request whose handler returned.
type limitsServer struct {
	srv  *httptest.Server
	ca   *testCA
	done chan struct{}

	mu      sync.Mutex
	revoked map[string]bool
}

func newLimitsServer(t *testing.T, c *Cache, lim HTTPLimits) *limitsServer {
	t.Helper()
	s := &limitsServer{ca: newTestCA(t), done: make(chan struct{}, 16), revoked: map[string]bool{}}
	identify := func(r *http.Request) (string, bool) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
			return "", false
		}
		dev := r.TLS.VerifiedChains[0][0].Subject.CommonName
		s.mu.Lock()
		defer s.mu.Unlock()
		return dev, !s.revoked[dev]
	}
	h := c.HTTPHandler(identify, lim)
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
		s.done <- struct{}{}
	}))
	s.srv.Listener = smallBufListener{s.srv.Listener}
	s.srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: s.ca.pool, MinVersion: tls.VersionTLS12}
	s.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	s.srv.StartTLS()
	t.Cleanup(s.srv.Close)
	return s
}

func (s *limitsServer) revoke(dev string) {
	s.mu.Lock()
	s.revoked[dev] = true
	s.mu.Unlock()
}

// waitDone waits for one handler to return.
func (s *limitsServer) waitDone(t *testing.T, what string) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s: the handler did not return within 20s", what)
	}
}

// get starts a GET of path as dev on a connection of its own whose
// receive buffer is small, and reads the response's head: the handler is
// then writing the body. The caller reads as much of the body as it
// wants; the connection is closed at the end of the test.
func (s *limitsServer) get(t *testing.T, dev, path string) (*http.Response, net.Conn) {
	t.Helper()
	cfg := s.srv.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	cfg.Certificates = []tls.Certificate{s.ca.issue(t, dev)}
	d := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, smallBuffers)
		})
		return errors.Join(err, serr)
	}}
	conn, err := tls.DialWithDialer(d, "tcp", s.srv.Listener.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, s.srv.URL+path, nil)
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		t.Fatal(err)
	}
	return resp, conn
}

// bigImageFixture: one good check with a class-A image far larger than
// the socket buffers between smallBufListener and get's client.
func bigImageFixture(t *testing.T) (*fixture, Offer) {
	t.Helper()
	f := newFixture(t)
	f.repo.addImage(classA, "1.1.0", 1, testImage(2<<20, 42))
	f.repo.addImage(classB, "2.1", 1, testImage(3000, 43))
	f.repo.publish()
	c := f.open(t)
	if err := c.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	o, ok := c.Offer("dev-a")
	if !ok {
		t.Fatal("no offer for dev-a")
	}
	return f, o
}

// TestHTTPSStalledDownloadIsEnded: a device that asks for an image and
// stops reading holds the handler no longer than a write makes no
// progress, not for as long as its connection lives.
func TestHTTPSStalledDownloadIsEnded(t *testing.T) {
	f, o := bigImageFixture(t)
	s := newLimitsServer(t, f.cache, HTTPLimits{WriteStall: 200 * time.Millisecond})
	resp, _ := s.get(t, "dev-a", o.Path)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", o.Path, resp.Status)
	}
	// The device reads nothing more.
	s.waitDone(t, "stalled download")
	if got := f.cache.Status().Counters.ServeCut; got != 1 {
		t.Errorf("ServeCut = %d, want 1", got)
	}
}

// TestHTTPSDownloadsPerDeviceAreCapped: a device holds at most PerDevice
// image responses at once; one more is answered 503 with Retry-After,
// other devices are served, and a slot given back is taken again.
func TestHTTPSDownloadsPerDeviceAreCapped(t *testing.T) {
	f, o := bigImageFixture(t)
	s := newLimitsServer(t, f.cache, HTTPLimits{PerDevice: 2, WriteStall: time.Minute})
	_, first := s.get(t, "dev-a", o.Path)
	s.get(t, "dev-a", o.Path) // both now blocked writing: dev-a reads neither
	refusedBefore := f.cache.Status().Counters.ServeRefused

	resp, _ := s.get(t, "dev-a", o.Path)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "60" {
		t.Errorf("third download of dev-a: %s, Retry-After %q; want 503 and 60", resp.Status, resp.Header.Get("Retry-After"))
	}
	s.waitDone(t, "refused download")
	if got := f.cache.Status().Counters.ServeRefused - refusedBefore; got != 1 {
		t.Errorf("ServeRefused grew by %d, want 1", got)
	}

	ob := "/fw/" + classB.Vendor + "/" + classB.Model
	resp, _ = s.get(t, "dev-b", ob)
	n, err := io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK || err != nil || n != 3000 {
		t.Errorf("dev-b while dev-a is at its cap: %s, %d bytes, %v; want 200 and 3000", resp.Status, n, err)
	}
	s.waitDone(t, "dev-b's download")

	first.Close()
	s.waitDone(t, "dev-a's download whose connection closed")
	resp, _ = s.get(t, "dev-a", o.Path)
	n, err = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK || err != nil || n != o.Size {
		t.Errorf("dev-a after one of its downloads ended: %s, %d bytes, %v; want 200 and %d", resp.Status, n, err, o.Size)
	}
}

// TestHTTPSRevokedDeviceTransferEnds: a device revoked in the middle of a
// download gets no more of it.
func TestHTTPSRevokedDeviceTransferEnds(t *testing.T) {
	f, o := bigImageFixture(t)
	s := newLimitsServer(t, f.cache, HTTPLimits{Recheck: time.Nanosecond})
	resp, _ := s.get(t, "dev-a", o.Path)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", o.Path, resp.Status)
	}
	head := make([]byte, 64<<10)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		t.Fatal(err)
	}
	s.revoke("dev-a")
	n, err := io.Copy(io.Discard, resp.Body)
	n += int64(len(head))
	if err == nil || n >= o.Size {
		t.Errorf("after revocation the device read %d of %d bytes (err %v), want the transfer cut short", n, o.Size, err)
	}
	s.waitDone(t, "revoked device's download")
	if got := f.cache.Status().Counters.ServeCut; got != 1 {
		t.Errorf("ServeCut = %d, want 1", got)
	}
}

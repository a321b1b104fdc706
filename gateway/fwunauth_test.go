package gateway

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// dialFrom opens a TCP connection to addr from the loopback address from
// (any of 127.0.0.0/8), closed when the test ends.
func dialFrom(t *testing.T, from, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// authConnFrom opens a connection to addr from the loopback address from,
// authenticated as device d: the TLS handshake with its certificate, then
// a GET /fw/offer answered; the connection stays open (kept alive) until
// the test ends.
func authConnFrom(t *testing.T, d *devicesim.Device, from, addr string) net.Conn {
	t.Helper()
	cfg, err := d.TLSConfig(addr)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(dialFrom(t, from, addr), cfg)
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("device handshake from %s: %v", from, err)
	}
	if _, err := fmt.Fprintf(tc, "GET /fw/offer HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		t.Fatalf("device GET /fw/offer from %s: %v", from, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNoContent {
		t.Fatalf("device GET /fw/offer from %s: %s, want 200 or 204", from, resp.Status)
	}
	tc.SetDeadline(time.Time{})
	return tc
}

// fwOfferFrom GETs /fw/offer as device d over a connection from the
// loopback address from, and returns the status.
func fwOfferFrom(t *testing.T, d *devicesim.Device, from, addr string) (int, error) {
	t.Helper()
	hc, err := d.HTTPSClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	tr := hc.Transport.(*http.Transport)
	tr.DialContext = (&net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}).DialContext
	defer hc.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr+"/fw/offer", nil)
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitCount waits (bounded) until c reads want.
func waitCount(t *testing.T, what string, c func() float64, want float64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for c() < want {
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", what, c(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := c(); got != want {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

// TestFirmwareHTTPSUnauthPerSource: one host that opens as many
// connections as the listener holds in all, and sends nothing on them,
// keeps only fwMaxUnauthPerSource; the rest are closed at once and counted
// as handshake_limit, and a device from another address gets its answer.
// Before, those connections took every one of the fwMaxConns places for
// the 10 s of the handshake timeout (and again as the host reopened them).
func TestFirmwareHTTPSUnauthPerSource(t *testing.T) {
	g := startFirmwareGateway(t, newFWVendor(t))
	dev, _ := g.addFWDevice(t, "thermo", "cert", fwClassA)
	addr := g.g.FirmwareHTTPSAddr().String()
	count := func(reason string) func() float64 {
		return func() float64 {
			return testutil.ToFloat64(g.g.metrics.httpsRefusals.WithLabelValues("firmware", reason))
		}
	}
	conns := make([]net.Conn, fwMaxConns)
	for i := range conns {
		conns[i] = dialFrom(t, "127.0.0.1", addr)
	}
	// Accepted after them (the kernel's accept queue is first in, first
	// out).
	status, err := fwOfferFrom(t, dev, "127.0.0.2", addr)
	if err != nil || (status != http.StatusOK && status != http.StatusNoContent) {
		t.Errorf("a device from another address while 127.0.0.1 stalls: %d, %v; want its offer (200 or 204)", status, err)
	}
	waitCount(t, "handshake_limit refusals", count(hub.ReasonHandshakeLimit), fwMaxConns-fwMaxUnauthPerSource)
	// The last one, past the bound, is closed.
	last := conns[len(conns)-1]
	last.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := last.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("a connection past the per-address bound: read %d bytes, %v; want it closed", n, err)
	}
	if n := count("conn_limit")(); n != 0 {
		t.Errorf("conn_limit refusals = %v, want 0", n)
	}
	if n := count(hub.ReasonHandshakeFailed)(); n != 0 {
		t.Errorf("handshake_failed = %v, want 0 (the refused connections are counted once, as handshake_limit)", n)
	}
	if n := g.log.Lines("firmware https: connection refused: too many not yet authenticated from this address", "remote=127.0.0.1:"); len(n) == 0 {
		t.Errorf("no log line for the refused connections in:\n%s", g.log.String())
	}
}

// TestFirmwareHTTPSUnauthTotal: hosts that stall handshakes from many
// addresses, each within its bound, reach fwMaxUnauth in all; past it the
// oldest is closed (not the new one refused), counted once as
// handshake_limit (its failed handshake is not counted again as
// handshake_failed), and a device still gets through.
func TestFirmwareHTTPSUnauthTotal(t *testing.T) {
	g := startFirmwareGateway(t, newFWVendor(t))
	dev, _ := g.addFWDevice(t, "thermo", "cert", fwClassA)
	addr := g.g.FirmwareHTTPSAddr().String()
	count := func(reason string) func() float64 {
		return func() float64 {
			return testutil.ToFloat64(g.g.metrics.httpsRefusals.WithLabelValues("firmware", reason))
		}
	}
	const extra = 3
	var conns []net.Conn
	for i := 0; len(conns) < fwMaxUnauth+extra; i++ {
		from := fmt.Sprintf("127.0.1.%d", 1+i/fwMaxUnauthPerSource)
		conns = append(conns, dialFrom(t, from, addr))
	}
	waitCount(t, "handshake_limit refusals", count(hub.ReasonHandshakeLimit), extra)
	for i, c := range conns[:extra] {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Errorf("oldest connection %d: read %d bytes, %v; want it closed", i, n, err)
		}
	}
	// Each closed connection's failed handshake reaches the ErrorLog,
	// which says it ended for room (at debug) and counts nothing more.
	ended := func() int {
		return len(g.log.Lines("firmware https: TLS handshake ended: closed to make room for a newer connection"))
	}
	deadline := time.Now().Add(20 * time.Second)
	for ended()+int(count(hub.ReasonHandshakeFailed)()) < extra {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d closed handshakes reached the ErrorLog:\n%s", extra, g.log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := count(hub.ReasonHandshakeFailed)(); n != 0 || ended() != extra {
		t.Errorf("handshake_failed = %v, handshakes ended for room %d; want 0 and %d: the closed connections are counted once, as handshake_limit", n, ended(), extra)
	}
	status, err := fwOfferFrom(t, dev, "127.0.0.2", addr)
	if err != nil || (status != http.StatusOK && status != http.StatusNoContent) {
		t.Errorf("a device while fwMaxUnauth connections stall: %d, %v; want its offer (200 or 204)", status, err)
	}
	if n := g.log.Lines("firmware https: oldest unauthenticated connection closed: too many not yet authenticated in all"); len(n) == 0 {
		t.Errorf("no log line for the closed connections in:\n%s", g.log.String())
	}
}

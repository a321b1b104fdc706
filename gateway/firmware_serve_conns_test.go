package gateway

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
)

// offerOn GETs /fw/offer on c, a connection authConnFrom kept alive, and
// fails the test unless the answer is 200 or 204.
func offerOn(t *testing.T, c net.Conn, addr, what string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "GET /fw/offer HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
		t.Errorf("%s: %v; want it still open", what, err)
		return
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Errorf("%s: %v; want it still open", what, err)
		return
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNoContent {
		t.Errorf("%s: %s, want 200 or 204", what, resp.Status)
	}
}

// fullFirmwareListener is a firmware HTTPS listener with all of its
// fwMaxConns places taken: auth of them by device connections from
// 127.0.0.1 (an image download in progress, then connections kept alive
// after a GET /fw/offer), the rest by connections from 127.0.1.x,
// fwMaxUnauthPerSource per address, that send nothing (as a LAN host that
// stalls handshakes).
type fullFirmwareListener struct {
	g      *fwgw
	dev    *devicesim.Device
	addr   string
	img    []byte
	dl     *http.Response // the download in progress, its first 16 KiB read
	kept   []net.Conn     // authenticated, kept alive
	stalls []net.Conn     // oldest first
}

func fillFirmwareListener(t *testing.T, auth int) *fullFirmwareListener {
	t.Helper()
	v := newFWVendor(t)
	// Larger than loopback's socket buffers: the server is still writing
	// it while the test goes on.
	img := tufrepo.Image(16<<20, 7)
	sha := v.publish(t, fwClassA, "1.1.0", 1, img)
	g := startFirmwareGateway(t, v)
	dev, _ := g.addFWDevice(t, "thermo", "cert", fwClassA)
	g.check(t)
	f := &fullFirmwareListener{g: g, dev: dev, addr: g.g.FirmwareHTTPSAddr().String(), img: img}

	hc, err := dev.HTTPSClient(f.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hc.CloseIdleConnections)
	req, _ := http.NewRequestWithContext(ctxT(t, 60*time.Second), http.MethodGet, "https://"+f.addr+"/fw/sha256/"+sha, nil)
	if f.dl, err = hc.Do(req); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.dl.Body.Close() })
	if f.dl.StatusCode != http.StatusOK {
		t.Fatalf("image download: %s, want 200", f.dl.Status)
	}
	if _, err := io.ReadFull(f.dl.Body, make([]byte, 16<<10)); err != nil {
		t.Fatalf("image download: %v", err)
	}
	for range auth - 1 {
		f.kept = append(f.kept, authConnFrom(t, dev, "127.0.0.1", f.addr))
	}
	for i := range fwMaxConns - auth {
		f.stalls = append(f.stalls, dialFrom(t, fmt.Sprintf("127.0.1.%d", 1+i/fwMaxUnauthPerSource), f.addr))
	}
	return f
}

func (f *fullFirmwareListener) count(reason string) float64 {
	return testutil.ToFloat64(f.g.g.metrics.httpsRefusals.WithLabelValues("firmware", reason))
}

// deviceGetsIn checks that a device connecting from the loopback address
// from gets its offer.
func (f *fullFirmwareListener) deviceGetsIn(t *testing.T, from string) {
	t.Helper()
	status, err := fwOfferFrom(t, f.dev, from, f.addr)
	if err != nil || (status != http.StatusOK && status != http.StatusNoContent) {
		t.Fatalf("a device from %s while the listener is full of stalls and downloads: %d, %v; want its offer (200 or 204)\nlog:\n%s",
			from, status, err, f.g.log.String())
	}
}

// authenticatedUntouched checks that every authenticated connection still
// works: each kept-alive one answers another request, and the download
// completes with the image's digest.
func (f *fullFirmwareListener) authenticatedUntouched(t *testing.T) {
	t.Helper()
	for i, c := range f.kept {
		offerOn(t, c, f.addr, fmt.Sprintf("authenticated connection %d", i))
	}
	rest, err := io.ReadAll(f.dl.Body)
	if err != nil {
		t.Fatalf("the download in progress: %v after %d bytes more; want the rest of the image", err, len(rest))
	}
	// Its first 16 KiB were read and dropped: the rest is compared.
	if !bytes.Equal(rest, f.img[16<<10:]) {
		t.Errorf("the download in progress completed with %d bytes more, want the image's other %d", len(rest), len(f.img)-16<<10)
	}
}

// TestFirmwareHTTPSStallsPushedOutByTotal: half of the places held by
// authenticated devices (downloads), the other half (fwMaxUnauth) by
// connections that stall. A new device gets in: the oldest stalled
// connection is closed for it (the total's bound), counted once as
// handshake_limit, and no authenticated connection is touched. Before,
// the listener's cap refused the new connection before the unauthenticated
// bound could close the oldest, and the stalls kept every new device out
// until their handshake timeout (and again as the host reopened them).
func TestFirmwareHTTPSStallsPushedOutByTotal(t *testing.T) {
	f := fillFirmwareListener(t, fwMaxConns-fwMaxUnauth)
	f.deviceGetsIn(t, "127.0.0.2")
	if n := f.count(hub.ReasonHandshakeLimit); n != 1 {
		t.Errorf("handshake_limit = %v, want 1 (the oldest stall closed for the device)", n)
	}
	if n := f.count("conn_limit"); n != 0 {
		t.Errorf("conn_limit = %v, want 0 (no new connection refused)", n)
	}
	f.authenticatedUntouched(t)
	if l := f.g.log.Lines("firmware https: oldest unauthenticated connection closed: too many not yet authenticated in all"); len(l) == 0 {
		t.Errorf("no log line for the closed stall in:\n%s", f.g.log.String())
	}
}

// TestFirmwareHTTPSStallsPushedOutWhenFull: authenticated connections
// hold more than half of the places and stalls (fewer than fwMaxUnauth,
// each address within its bound) the rest. A host at its per-address
// bound is still refused at once, and closes no other connection; a new
// device gets in: the oldest connection not authenticated is closed for
// it, counted as handshake_limit, never an authenticated one. Before, the
// listener's cap refused them both (conn_limit), the device as the host.
func TestFirmwareHTTPSStallsPushedOutWhenFull(t *testing.T) {
	const stalls = fwMaxUnauth / 2
	f := fillFirmwareListener(t, fwMaxConns-stalls)
	last := f.stalls[stalls-1].LocalAddr().(*net.TCPAddr).IP.String()
	over := dialFrom(t, last, f.addr)
	waitCount(t, "handshake_limit", func() float64 { return f.count(hub.ReasonHandshakeLimit) }, 1)
	over.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := over.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("a connection past %s's bound: read %d bytes, %v; want it closed", last, n, err)
	}
	if l := f.g.log.Lines("firmware https: connection refused: too many not yet authenticated from this address", "remote="+last+":"); len(l) == 0 {
		t.Errorf("no log line for the connection past %s's bound in:\n%s", last, f.g.log.String())
	}

	f.deviceGetsIn(t, "127.0.0.2")
	// One more: the refused connection closed no other.
	if n := f.count(hub.ReasonHandshakeLimit); n != 2 {
		t.Errorf("handshake_limit = %v, want 2 (the refused connection, then the oldest stall closed for the device)", n)
	}
	if n := f.count("conn_limit"); n != 0 {
		t.Errorf("conn_limit = %v, want 0 (no new connection refused for want of room)", n)
	}
	f.stalls[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := f.stalls[0].Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("the oldest stall: read %d bytes, %v; want it closed", n, err)
	}
	if l := f.g.log.Lines("firmware https: oldest unauthenticated connection closed: the listener's connections are all in use"); len(l) == 0 {
		t.Errorf("no log line for the closed stall in:\n%s", f.g.log.String())
	}
	f.authenticatedUntouched(t)
}

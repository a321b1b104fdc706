package gateway

// The per-source DTLS handshake limit (bridges/coap/limit.go) counts only
// clients that echoed the HelloVerifyRequest cookie: ClientHellos from a
// spoofed address cannot lock that address's device out. Uses
// transports_test.go's helpers (startTransports, clientHello).

import (
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// sendHellos sends the ClientHello hello to addr from n sockets of
// 127.0.0.1 and returns them (it does not wait for the answers).
func sendHellos(t *testing.T, addr string, hello []byte, n int) []*net.UDPConn {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var cs []*net.UDPConn
	for range n {
		c, err := net.DialUDP("udp", nil, raddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write(hello); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	return cs
}

// helloVerifyCookie reads the gateway's answer to a first ClientHello on
// c: it must be a HelloVerifyRequest; its cookie is returned.
func helloVerifyCookie(t *testing.T, c *net.UDPConn) []byte {
	t.Helper()
	b := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(b)
	if err != nil {
		t.Fatalf("no answer to a ClientHello: %v", err)
	}
	// A handshake record (22) whose first message is of type 3.
	if n < 14 || b[0] != 22 || b[13] != byte(handshake.TypeHelloVerifyRequest) {
		t.Fatalf("answer to a ClientHello starts % x, want a HelloVerifyRequest (handshake type 3)", b[:min(n, 14)])
	}
	recs, err := recordlayer.UnpackDatagram(b[:n])
	if err != nil {
		t.Fatalf("answer to a ClientHello: %v", err)
	}
	var rec recordlayer.RecordLayer
	if err := rec.Unmarshal(recs[0]); err != nil {
		t.Fatalf("answer to a ClientHello % x: %v", recs[0], err)
	}
	hs, ok := rec.Content.(*handshake.Handshake)
	if !ok {
		t.Fatalf("answer to a ClientHello is a %T, want a handshake record", rec.Content)
	}
	hvr, ok := hs.Message.(*handshake.MessageHelloVerifyRequest)
	if !ok {
		t.Fatalf("answer to a ClientHello is a %T, want a HelloVerifyRequest", hs.Message)
	}
	return hvr.Cookie
}

// withCookie is the second ClientHello of a handshake: hello with cookie,
// message and record sequence 1 (RFC 6347 4.2.1).
func withCookie(t *testing.T, hello, cookie []byte) []byte {
	t.Helper()
	var rec recordlayer.RecordLayer
	if err := rec.Unmarshal(hello); err != nil {
		t.Fatal(err)
	}
	hs := rec.Content.(*handshake.Handshake)
	hs.Message.(*handshake.MessageClientHello).Cookie = cookie
	hs.Header.MessageSequence = 1
	rec.Header.SequenceNumber = 1
	out, err := rec.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Twelve ClientHellos from 127.0.0.1 that never echo the cookie (what a
// host spoofing a device's address can send) are answered and forgotten,
// and a device handshaking from 127.0.0.1 still gets in. They once took
// the address's 8 slots for the 10 s handshake timeout; until session 14
// each held a connection for 2 s.
func TestCookielessClientHellosDoNotLockOutASource(t *testing.T) {
	g := startTransports(t)
	addr := g.g.Addrs()["coaps_psk"]
	for _, c := range sendHellos(t, addr, clientHello(t), 12) {
		helloVerifyCookie(t, c)
	}
	deviceGetsIn(t, g.addDevice(t, "neighbour", "psk"), addr, "from 127.0.0.1 with 12 cookieless ClientHellos sent")
	if n := g.refusals(hub.CoAP, hub.ReasonHandshakeLimit); n != 0 {
		t.Errorf("handshake-limit refusals %v, want 0: cookieless ClientHellos were counted", n)
	}
}

// serverHello reads the gateway's next flight on c: it must start with a
// ServerHello (flight 4: the handshake goes on).
func serverHello(t *testing.T, c *net.UDPConn) {
	t.Helper()
	b := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(b)
	if err != nil {
		t.Fatalf("no flight 4 after the cookie was echoed: %v", err)
	}
	if n < 14 || b[0] != 22 || b[13] != byte(handshake.TypeServerHello) {
		t.Fatalf("answer to the ClientHello with cookie % x, want a ServerHello", b[:min(n, 32)])
	}
}

// Handshakes whose client echoed the cookie and then stalled are still
// limited per source: 8 from 127.0.0.1 go on to flight 4 and wait for
// the client's next flight; the next 4 are refused.
func TestDTLSHandshakesWithCookieLimitedPerSource(t *testing.T) {
	g := startTransports(t)
	addr := g.g.Addrs()["coaps_psk"]
	hello := clientHello(t)
	for i, c := range sendHellos(t, addr, hello, 12) {
		if _, err := c.Write(withCookie(t, hello, helloVerifyCookie(t, c))); err != nil {
			t.Fatal(err)
		}
		if i < 8 { // the default limit
			serverHello(t, c)
		}
	}
	g.waitLog(t, "too many handshakes in flight from this source", "remote=127.0.0.1:")
	deadline := time.Now().Add(5 * time.Second)
	for g.refusals(hub.CoAP, hub.ReasonHandshakeLimit) < 4 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := g.refusals(hub.CoAP, hub.ReasonHandshakeLimit); n != 4 {
		t.Errorf("handshake-limit refusals %v, want 4", n)
	}
}

// A flood of ClientHellos that never echo their cookie (from spoofed
// addresses, one datagram each) holds nothing in the gateway: each is
// answered with a HelloVerifyRequest by the listener and forgotten
// (pion-dtls patch (51)), and a device handshakes in the middle of it.
// Until 2026-11-26 every ClientHello held a connection and a goroutine
// for 2 s (5,000 in 0.7 s: 2,274 goroutines, 20 MiB of heap), at most 512
// of them from session 13 on.
func TestClientHelloFloodKeepsNoState(t *testing.T) {
	g := startTransports(t)
	addr := g.g.Addrs()["coaps_psk"]
	d := g.addDevice(t, "flooded", "psk")
	base := runtime.NumGoroutine()
	const n = 3000
	hello := clientHello(t)
	cs := sendHellos(t, addr, hello, n)
	// The last senders get their HelloVerifyRequest, so the listener has
	// read the flood. A datagram may be lost when the socket's buffer
	// overflows on a loaded machine: each asks again, at most 5 times.
	for _, c := range cs[len(cs)-10:] {
		b := make([]byte, 2048)
		for try := 0; ; try++ {
			c.SetReadDeadline(time.Now().Add(time.Second))
			if n, err := c.Read(b); err == nil && n > 13 && b[13] == byte(handshake.TypeHelloVerifyRequest) {
				break
			}
			if try == 4 {
				t.Fatal("no HelloVerifyRequest for a ClientHello sent 5 times")
			}
			if _, err := c.Write(hello); err != nil {
				t.Fatal(err)
			}
		}
	}
	if grew := runtime.NumGoroutine() - base; grew > 20 {
		t.Errorf("%d goroutines more after %d cookieless ClientHellos, want none held for them", grew, n)
	}
	deviceGetsIn(t, d, addr, "during the flood")
}

// deviceGetsIn has d handshake with the gateway's DTLS listener at addr
// (when, for the failure message) and publish once.
func deviceGetsIn(t *testing.T, d *devicesim.Device, addr, when string) {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	co, err := d.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatalf("device handshake %s: %v", when, err)
	}
	defer co.Close()
	if r, err := co.Publish(ctx, "x", []byte("1")); err != nil || r.Code != codes.Changed {
		t.Fatalf("publish %s: %v %v", when, r.Code, err)
	}
}

// A device holds at most eight DTLS sessions: a ninth closes its oldest
// (counted session_taken_over, logged). A device that reboots starts a new
// handshake while its old session lingers until the idle timeout; without
// the bound every reboot, or a device with valid credentials opening
// sessions on purpose, held another one.
func TestCoAPSessionsPerDeviceBounded(t *testing.T) {
	g := startTransports(t)
	addr := g.g.Addrs()["coaps_psk"]
	d := g.addDevice(t, "reboots", "psk")
	ctx := ctxT(t, 30*time.Second)
	var open []*devicesim.CoAP
	for range 9 {
		co, err := d.DialCoAP(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer co.Close()
		open = append(open, co)
	}
	select {
	case <-open[0].Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the device's oldest session is still open after its ninth handshake")
	}
	for i, co := range open[1:] {
		if r, err := co.Publish(ctx, "x", []byte("1")); err != nil || r.Code != codes.Changed {
			t.Fatalf("session %d of the newest eight: publish: %v %v", i+2, r.Code, err)
		}
	}
	if n := g.refusals(hub.CoAP, hub.ReasonSessionTakenOver); n != 1 {
		t.Errorf("session_taken_over refusals %v, want 1", n)
	}
	g.waitLog(t, "coap: oldest session of the device closed", "device="+d.ID)
}

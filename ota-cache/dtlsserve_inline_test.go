package otacache

import (
	"bytes"
	"context"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	coapnet "github.com/plgd-dev/go-coap/v3/net"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// onListenerReadLoop reports whether the caller runs on pion's listener
// read loop (DTLSServeConfig.Inline).
func onListenerReadLoop() bool {
	buf := make([]byte, 32<<10)
	return strings.Contains(string(buf[:runtime.Stack(buf, false)]), "udp.(*listener).readLoop")
}

// coapDevice is a DTLS-PSK client that sends CoAP requests and reads the
// answers in whatever order they come.
type coapDevice struct {
	t  *testing.T
	dc *piondtls.Conn
}

func dialCoAPDevice(t *testing.T, addr *net.UDPAddr, id string) *coapDevice {
	t.Helper()
	cfg := pskConfig(func(string) ([]byte, bool) { return []byte(testPSKs[id]), true })
	cfg.PSKIdentityHint = []byte(id)
	dc, err := piondtls.Dial("udp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	return &coapDevice{t: t, dc: dc}
}

func (d *coapDevice) send(mid int32, path string) []byte {
	d.t.Helper()
	m := pool.NewMessage(context.Background())
	m.SetCode(codes.POST)
	m.SetType(message.Confirmable)
	m.SetMessageID(mid)
	m.SetToken(message.Token{byte(mid)})
	if err := m.SetPath(path); err != nil {
		d.t.Fatal(err)
	}
	raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.dc.Write(raw); err != nil {
		d.t.Fatal(err)
	}
	return raw
}

// answer reads the next answer: its message ID, code and the raw bytes.
func (d *coapDevice) answer() (int32, codes.Code, []byte) {
	d.t.Helper()
	buf := make([]byte, 2048)
	_ = d.dc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := d.dc.Read(buf)
	if err != nil {
		d.t.Fatalf("no answer: %v", err)
	}
	resp := pool.NewMessage(context.Background())
	if _, err := resp.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
		d.t.Fatal(err)
	}
	return resp.MessageID(), resp.Code(), buf[:n]
}

// serveInBackground runs ServeDTLS on l until the test ends.
func serveInBackground(t *testing.T, l *coapnet.DTLSListener, cfg DTLSServeConfig) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = ServeDTLS(ctx, l, cfg)
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// TestServeDTLSInlineDeferred: with Inline, handlers run on the listener's
// read loop; a handler that defers its answer (as one waiting for the disk
// must) holds up neither its own session nor another; a retransmission of
// the deferred request is not handled again; the deferred answer goes out
// on Done and a later retransmission is answered with it from the cache.
func TestServeDTLSInlineDeferred(t *testing.T) {
	l := testPSKListener(t)
	defer l.Close()
	var slowCalls, calls, inline atomic.Int32
	deferred := make(chan *DTLSDeferred, 4)
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		calls.Add(1)
		if onListenerReadLoop() {
			inline.Add(1)
		}
		if p, _ := r.Path(); p == "/slow" {
			slowCalls.Add(1)
			deferred <- w.Defer()
			return
		}
		_ = w.SetResponse(codes.Changed, message.TextPlain, bytes.NewReader([]byte("fast")))
	}
	serveInBackground(t, l, DTLSServeConfig{Handler: h, OnNewConn: learnIdentity, Inline: func(*DTLSConn) bool { return true }})

	a := dialCoAPDevice(t, l.Addr().(*net.UDPAddr), "dev-a")
	b := dialCoAPDevice(t, l.Addr().(*net.UDPAddr), "dev-b")

	// A first request each: one sent right after the handshake can reach
	// the session before its handler is set (then the record reader has
	// it); after it, requests are taken on the read loop (but for one
	// that races with the record reader finishing the first).
	for i, dev := range []*coapDevice{a, b} {
		dev.send(int32(100+i), "/fast")
		dev.answer()
	}
	calls.Store(0)
	inline.Store(0)

	a.send(1, "/slow")
	var d *DTLSDeferred
	select {
	case d = <-deferred:
	case <-time.After(5 * time.Second):
		t.Fatal("slow request never reached the handler")
	}
	// While 1 waits: its retransmission is dropped, and both sessions are
	// answered.
	a.send(1, "/slow")
	a.send(2, "/fast")
	if mid, code, _ := a.answer(); mid != 2 || code != codes.Changed {
		t.Fatalf("dev-a answer: message %d %v, want 2 Changed (1 is still deferred)", mid, code)
	}
	b.send(7, "/fast")
	if mid, code, _ := b.answer(); mid != 7 || code != codes.Changed {
		t.Fatalf("dev-b answer: message %d %v, want 7 Changed", mid, code)
	}
	if n := slowCalls.Load(); n != 1 {
		t.Fatalf("deferred request handled %d times, want 1 (a retransmission is not handled again)", n)
	}
	_ = d.SetResponse(codes.Changed, message.TextPlain, bytes.NewReader([]byte("durable")))
	d.Done()
	d.Done() // only the first counts
	mid, code, first := a.answer()
	if mid != 1 || code != codes.Changed {
		t.Fatalf("deferred answer: message %d %v, want 1 Changed", mid, code)
	}
	a.send(1, "/slow")
	mid, _, again := a.answer()
	if mid != 1 || !bytes.Equal(first, again) {
		t.Fatalf("retransmission after Done: message %d %x, want the cached answer %x", mid, again, first)
	}
	if n := slowCalls.Load(); n != 1 {
		t.Fatalf("deferred request handled %d times, want 1", n)
	}
	if n, c := inline.Load(), calls.Load(); c != 3 || n < 1 {
		t.Fatalf("%d of %d handler calls on the listener's read loop, want 3 calls, most on it", n, c)
	}
}

// TestServeDTLSDeferDoneBeforeReturn: a handler's deferred answer can be
// Done before the handler returns (the disk was quick, on another
// goroutine; here on the handler's own). The answer goes out once, intact,
// and the server does not use the released writer: the old code sent it,
// released the writer, then found no deferral on it and answered again from
// a nil message (bastiond crashed in the power-cut test under load).
func TestServeDTLSDeferDoneBeforeReturn(t *testing.T) {
	l := testPSKListener(t)
	defer l.Close()
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		d := w.Defer()
		_ = d.SetResponse(codes.Changed, message.TextPlain, bytes.NewReader([]byte("durable")))
		d.Done()
	}
	serveInBackground(t, l, DTLSServeConfig{Handler: h, OnNewConn: learnIdentity, Inline: func(*DTLSConn) bool { return true }})
	a := dialCoAPDevice(t, l.Addr().(*net.UDPAddr), "dev-a")
	for i := range 20 {
		a.send(int32(10+i), "/t")
		if mid, code, body := a.answer(); mid != int32(10+i) || code != codes.Changed || !bytes.HasSuffix(body, []byte("durable")) {
			t.Fatalf("answer %d: message %d %v %q, want %d Changed with \"durable\"", i, mid, code, body, 10+i)
		}
	}
}

// TestServeDTLSNotInline: without Inline the handler runs on the
// session's own record reader.
func TestServeDTLSNotInline(t *testing.T) {
	l := testPSKListener(t)
	defer l.Close()
	var inline atomic.Int32
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		if onListenerReadLoop() {
			inline.Add(1)
		}
		_ = w.SetResponse(codes.Changed, message.TextPlain, nil)
	}
	serveInBackground(t, l, DTLSServeConfig{Handler: h, Inline: func(*DTLSConn) bool { return false }})
	a := dialCoAPDevice(t, l.Addr().(*net.UDPAddr), "dev-a")
	for mid := int32(1); mid <= 3; mid++ {
		a.send(mid, "/x")
		if got, code, _ := a.answer(); got != mid || code != codes.Changed {
			t.Fatalf("answer %d %v, want %d Changed", got, code, mid)
		}
	}
	if n := inline.Load(); n != 0 {
		t.Fatalf("%d handler calls on the listener's read loop, want 0", n)
	}
}

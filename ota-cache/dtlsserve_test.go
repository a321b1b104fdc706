package otacache

import (
	"bytes"
	"context"
	"errors"
	"net"
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

// testPSKListener is a DTLS-PSK listener on a loopback port that knows
// testPSKs.
func testPSKListener(t *testing.T) *coapnet.DTLSListener {
	t.Helper()
	l, err := coapnet.NewDTLSListener("udp", "127.0.0.1:0", pskConfig(func(id string) ([]byte, bool) {
		k, ok := testPSKs[id]
		return []byte(k), ok
	}))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestServeDTLSReplaysAndStops checks the production accept loop over a
// real DTLS-PSK session: a retransmitted confirmable request (same message
// ID) is answered from the bounded response cache without running the
// handler again, OnNewConn runs once per session, and cancelling the
// context ends ServeDTLS with nil and closes the open session.
func TestServeDTLSReplaysAndStops(t *testing.T) {
	l := testPSKListener(t)
	defer l.Close()
	var calls, conns atomic.Int32
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		n := calls.Add(1)
		_ = w.SetResponse(codes.Content, message.TextPlain, bytes.NewReader([]byte{byte('0' + n)}))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- ServeDTLS(ctx, l, DTLSServeConfig{Handler: h, ResponseCacheEntries: 2, OnNewConn: func(*DTLSConn) { conns.Add(1) }})
	}()

	cfg := pskConfig(func(string) ([]byte, bool) { return []byte(testPSKs["dev-a"]), true })
	cfg.PSKIdentityHint = []byte("dev-a")
	raddr := l.Addr().(*net.UDPAddr)
	dc, err := piondtls.Dial("udp", raddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close()
	hctx, hcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer hcancel()
	if err := dc.HandshakeContext(hctx); err != nil {
		t.Fatal(err)
	}
	request := func(mid int32) string {
		t.Helper()
		m := pool.NewMessage(context.Background())
		m.SetCode(codes.GET)
		m.SetType(message.Confirmable)
		m.SetMessageID(mid)
		m.SetToken(message.Token{byte(mid)})
		if err := m.SetPath("/x"); err != nil {
			t.Fatal(err)
		}
		raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
		if err != nil {
			t.Fatal(err)
		}
		// Retransmit as a CoAP client does (RFC 7252 §4.2) until answered.
		buf := make([]byte, 2048)
		var n int
		for try := 0; ; try++ {
			if _, err := dc.Write(raw); err != nil {
				t.Fatal(err)
			}
			dc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			n, err = dc.Read(buf)
			if err == nil {
				break
			}
			if try == 10 {
				t.Fatalf("no answer to message %d after %d tries: %v", mid, try+1, err)
			}
		}
		resp := pool.NewMessage(context.Background())
		if _, err := resp.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
			t.Fatal(err)
		}
		if resp.MessageID() != mid {
			t.Fatalf("answer has message ID %d, want %d", resp.MessageID(), mid)
		}
		b, _ := resp.ReadBody()
		return string(b)
	}
	got := []string{request(100), request(100), request(101), request(102), request(103), request(100)}
	// 100 is replayed from the cache until two newer responses push it out
	// (ResponseCacheEntries: 2); then the handler answers it again.
	want := []string{"1", "1", "2", "3", "4", "5"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("answers %q, want %q (handler ran %d times)", got, want, calls.Load())
		}
	}
	if conns.Load() != 1 {
		t.Errorf("OnNewConn ran %d times for one session", conns.Load())
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeDTLS after cancel: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeDTLS did not return within 10s of cancel")
	}
	// The session was closed by the server: the device's reads now fail.
	dc.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := dc.Read(make([]byte, 64)); err == nil {
		t.Error("session still delivers data after ServeDTLS returned")
	}

	// Closing the listener also ends ServeDTLS with nil.
	l2, err := coapnet.NewDTLSListener("udp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- ServeDTLS(context.Background(), l2, DTLSServeConfig{Handler: h}) }()
	l2.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeDTLS after listener close: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeDTLS did not return within 10s of listener close")
	}
	if err := ServeDTLS(context.Background(), l2, DTLSServeConfig{}); err == nil || errors.Is(err, net.ErrClosed) {
		t.Errorf("ServeDTLS without handler: %v, want an error", err)
	}
}

// SPDX-FileCopyrightText: 2026 The Pion community <https://pion.ly>
// SPDX-License-Identifier: MIT

package dtls

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/pion/dtls/v3/internal/net/udp"
	dtlsnet "github.com/pion/dtls/v3/pkg/net"
	"github.com/pion/logging"
	"github.com/pion/transport/v5/dpipe"
	"github.com/pion/transport/v5/netctx"
)

// TestListenerPacketConn: a listener's connection is wrapped by
// listenerPacketConn (Bastion patch), which behaves as netctx's wrapper:
// data both ways, a blocked read ends with the context's error when it is
// cancelled, a cancelled write sends nothing, and Close ends both.
func TestListenerPacketConn(t *testing.T) {
	ln, err := udp.Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	raw, raddr, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	pc := newPacketConn(raw)
	if _, ok := pc.(*listenerPacketConn); !ok {
		t.Fatalf("listener connection wrapped as %T, want *listenerPacketConn", pc)
	}
	if pc.Conn() != raw {
		t.Fatal("Conn() is not the listener's connection")
	}
	ctx := context.Background()
	buf := make([]byte, 64)
	if n, _, err := pc.ReadFromContext(ctx, buf); err != nil || string(buf[:n]) != "first" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	if _, err := pc.WriteToContext(ctx, []byte("answer"), raddr); err != nil {
		t.Fatal(err)
	}
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client.Read(buf); err != nil || string(buf[:n]) != "answer" {
		t.Fatalf("client read %q, %v", buf[:n], err)
	}

	// A read blocked on an empty buffer ends when its context does.
	rctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { _, _, err := pc.ReadFromContext(rctx, buf); errc <- err }()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("read with a cancelled context: %v, want context.Canceled", err)
	}

	// A write whose context has ended sends nothing.
	if _, err := pc.WriteToContext(rctx, []byte("late"), raddr); !errors.Is(err, context.Canceled) {
		t.Fatalf("write with a cancelled context: %v, want context.Canceled", err)
	}
	if _, err := pc.WriteToContext(ctx, []byte("next"), raddr); err != nil {
		t.Fatal(err)
	}
	if n, err := client.Read(buf); err != nil || string(buf[:n]) != "next" {
		t.Fatalf("client read %q, %v (a cancelled write must not have been sent)", buf[:n], err)
	}

	// A read still works after a cancelled one.
	if _, err := client.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	if n, _, err := pc.ReadFromContext(ctx, buf); err != nil || string(buf[:n]) != "second" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}

	go func() { _, _, err := pc.ReadFromContext(ctx, buf); errc <- err }()
	if err := pc.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err == nil {
		t.Fatal("read blocked across Close returned no error")
	}
	if _, _, err := pc.ReadFromContext(ctx, buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after Close: %v, want net.ErrClosed", err)
	}
	if _, err := pc.WriteToContext(ctx, []byte("x"), raddr); !errors.Is(err, netctx.ErrClosing) {
		t.Fatalf("write after Close: %v, want netctx.ErrClosing", err)
	}
}

// traceRecorder is a LeveledLogger that keeps its Tracef formats and says
// whether it traces.
type traceRecorder struct {
	logging.LeveledLogger
	trace bool
	mu    sync.Mutex
	seen  []string
}

func (r *traceRecorder) TraceEnabled() bool { return r.trace }

func (r *traceRecorder) Tracef(format string, _ ...any) {
	r.mu.Lock()
	r.seen = append(r.seen, format)
	r.mu.Unlock()
}

func (r *traceRecorder) NewLogger(string) logging.LeveledLogger { return r }

func (r *traceRecorder) count(format string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, f := range r.seen {
		if f == format {
			n++
		}
	}

	return n
}

// TestTraceGate: the Tracef calls the Bastion patch gates are made for a
// logger that traces or does not say, and skipped for one that says it
// does not.
func TestTraceGate(t *testing.T) {
	gated := []string{
		"[handshake:%v] -> %s (epoch: %d, seq: %d)",
		"[handshake:%s] -> changeCipherSpec (epoch: %d)",
		"[handshake:%s] %s -> %s",
	}
	for _, trace := range []bool{true, false} {
		rec := &traceRecorder{LeveledLogger: logging.NewDefaultLoggerFactory().NewLogger("dtls"), trace: trace}
		ca, cb := dpipe.Pipe()
		psk := func([]byte) ([]byte, error) { return []byte{1, 2, 3, 4}, nil }
		cfg := func() *Config {
			return &Config{
				PSK: psk, PSKIdentityHint: []byte("id"), LoggerFactory: rec,
				CipherSuites: []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8},
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		errc := make(chan error, 1)
		var client *Conn
		go func() {
			var err error
			client, err = testClient(ctx, dtlsnet.PacketConnFromConn(ca), ca.RemoteAddr(), cfg(), false)
			errc <- err
		}()
		server, err := testServer(ctx, dtlsnet.PacketConnFromConn(cb), cb.RemoteAddr(), cfg(), false)
		if cerr := <-errc; err == nil {
			err = cerr
		}
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		_ = client.Close()
		_ = server.Close()
		for _, f := range gated {
			if n := rec.count(f); (n > 0) != trace {
				t.Errorf("TraceEnabled %v: %d Tracef(%q)", trace, n, f)
			}
		}
	}
}

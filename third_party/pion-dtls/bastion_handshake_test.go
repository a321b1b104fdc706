// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, pion-dtls (16)): a
// server connection of the listener runs its handshake on the calling
// goroutine, reading the client's flights itself.

package dtls

import (
	"context"
	"errors"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// bastionProxyPair is bastionPair with a configuration per side and the
// server's handshake context: it returns the client's and the server's
// handshake errors instead of failing.
func bastionProxyPair(t *testing.T, srvCfg, cliCfg *Config, srvTimeout, cliTimeout time.Duration,
	fwd func(p []byte, toServer bool) bool,
) (client, server *Conn, cliErr, srvErr error) {
	t.Helper()
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	proxy, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = proxy.Close(); _ = up.Close(); wg.Wait() })
	var clientAddr atomic.Pointer[net.UDPAddr]
	wg.Add(2)
	go func() {
		defer wg.Done()
		b := make([]byte, 2048)
		for {
			n, a, err := proxy.ReadFromUDP(b)
			if err != nil {
				return
			}
			clientAddr.Store(a)
			if fwd(b[:n], true) {
				_, _ = up.Write(b[:n])
			}
		}
	}()
	go func() {
		defer wg.Done()
		b := make([]byte, 2048)
		for {
			n, err := up.Read(b)
			if err != nil {
				return
			}
			if fwd(b[:n], false) {
				_, _ = proxy.WriteToUDP(b[:n], clientAddr.Load())
			}
		}
	}()
	type result struct {
		c   *Conn
		err error
	}
	srvc := make(chan result, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			srvc <- result{nil, err}
			return
		}
		c := nc.(*Conn)
		ctx, cancel := context.WithTimeout(context.Background(), srvTimeout)
		defer cancel()
		srvc <- result{c, c.HandshakeContext(ctx)}
	}()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	client, err = Client(pc, proxy.LocalAddr(), cliCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cliErr = client.HandshakeContext(ctx)
	if cliErr != nil {
		_ = client.Close() // the server's handshake may be waiting for it
	}
	r := <-srvc
	if r.c != nil {
		t.Cleanup(func() { _ = r.c.Close() })
	}
	return client, r.c, cliErr, r.err
}

// The server's PSK callback runs in the goroutine that called
// HandshakeContext: the state machine runs there (pion ran it on a
// goroutine of its own, next to a record reader goroutine).
func TestBastionServerHandshakeOnCallerGoroutine(t *testing.T) {
	var stack atomic.Value
	srv := bastionPSKConfig()
	key := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	srv.PSK = func([]byte) ([]byte, error) {
		b := make([]byte, 64<<10)
		stack.Store(string(b[:runtime.Stack(b, false)]))
		return key, nil
	}
	_, _, cliErr, srvErr := bastionProxyPair(t, srv, bastionPSKConfig(), 10*time.Second, 10*time.Second,
		func([]byte, bool) bool { return true })
	if cliErr != nil || srvErr != nil {
		t.Fatalf("handshake: client %v, server %v", cliErr, srvErr)
	}
	s, _ := stack.Load().(string)
	if !strings.Contains(s, "(*Conn).HandshakeContext") {
		t.Fatalf("the server's PSK callback did not run on the goroutine of HandshakeContext:\n%s", s)
	}
}

// A lost flight 4 is sent again when the server's retransmit timer (the
// read deadline of the inline handshake) expires: the client, whose own
// timer would fire only after the test, does not ask for it.
func TestBastionServerRetransmitsOnTimer(t *testing.T) {
	var mu sync.Mutex
	serverHellos := 0
	cli := bastionPSKConfig()
	cli.FlightInterval = time.Minute
	_, server, cliErr, srvErr := bastionProxyPair(t, bastionPSKConfig(), cli, 10*time.Second, 10*time.Second,
		func(p []byte, toServer bool) bool {
			mu.Lock()
			defer mu.Unlock()
			if !toServer && len(p) > 13 && p[0] == 22 && p[13] == 2 { // ServerHello: flight 4
				serverHellos++
				return serverHellos > 1
			}
			return true
		})
	if cliErr != nil || srvErr != nil {
		t.Fatalf("handshake: client %v, server %v", cliErr, srvErr)
	}
	mu.Lock()
	defer mu.Unlock()
	if serverHellos != 2 {
		t.Fatalf("flight 4 sent %d times, want 2", serverHellos)
	}
	if !server.fsm.parked.Load() {
		t.Fatal("the server's state machine did not end")
	}
}

// A handshake that runs out of its context's time returns the context's
// error as a HandshakeError and closes the connection, as pion's two
// goroutines did; the retransmit timer does not end it earlier.
func TestBastionServerHandshakeTimeout(t *testing.T) {
	cli := bastionPSKConfig()
	cli.FlightInterval = time.Minute
	start := time.Now()
	_, server, _, srvErr := bastionProxyPair(t, bastionPSKConfig(), cli, 400*time.Millisecond, 500*time.Millisecond,
		func(p []byte, toServer bool) bool {
			return !(toServer && len(p) > 13 && p[0] == 22 && p[13] == 16) // never flight 5
		})
	var he *HandshakeError
	if !errors.As(srvErr, &he) || !errors.Is(srvErr, context.DeadlineExceeded) {
		t.Fatalf("server handshake: %v (%T), want a HandshakeError with context.DeadlineExceeded", srvErr, srvErr)
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("server handshake ended after %v, before its context", d)
	}
	if !server.isConnectionClosed() {
		t.Fatal("server connection not closed after the failed handshake")
	}
	if server.fsm.parked.Load() || server.isHandshakeCompletedSuccessfully() {
		t.Fatal("failed handshake marked finished")
	}
}

// Close during a server handshake ends it with an error at once (the
// client's and the server's retransmit timers are a minute).
func TestBastionServerHandshakeClose(t *testing.T) {
	srv := bastionPSKConfig()
	srv.FlightInterval = time.Minute
	cli := bastionPSKConfig()
	cli.FlightInterval = time.Minute
	var srvConn atomic.Pointer[Conn]
	sawFlight4 := make(chan struct{})
	go func() {
		// The client got flight 4: the server waits for flight 5, which
		// never comes.
		<-sawFlight4
		_ = srvConn.Load().Close()
	}()
	start := time.Now()
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvErr := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		srvConn.Store(nc.(*Conn))
		srvErr <- nc.(*Conn).HandshakeContext(context.Background())
	}()
	// A client that stops after its second ClientHello.
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	drop := &dropFlight5Conn{PacketConn: pc, dropped: sawFlight4}
	client, err := Client(drop, ln.Addr(), cli)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	cctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	go func() { _ = client.HandshakeContext(cctx) }()
	select {
	case err := <-srvErr:
		if err == nil {
			t.Fatal("server handshake succeeded after Close")
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("server handshake ended %v after it started, not at Close", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server handshake did not end after Close")
	}
}

// dropFlight5Conn drops the client's flight 5; dropped is closed at the
// first.
type dropFlight5Conn struct {
	net.PacketConn
	dropped chan struct{}
	once    sync.Once
}

func (c *dropFlight5Conn) WriteTo(p []byte, a net.Addr) (int, error) {
	if len(p) > 13 && p[0] == 22 && p[13] == 16 {
		c.once.Do(func() { close(c.dropped) })
		return len(p), nil
	}
	return c.PacketConn.WriteTo(p, a)
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md): Conn.SetReadHandler,
// and the handshake goroutine ending once the handshake has finished.

package dtls

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"
)

func bastionPSKConfig() *Config {
	return &Config{
		PSK:             func([]byte) ([]byte, error) { return []byte{1, 2, 3, 4, 5, 6, 7, 8}, nil },
		PSKIdentityHint: []byte("device"),
		CipherSuites:    []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8},
		FlightInterval:  50 * time.Millisecond,
	}
}

// bastionPair connects a client to a listener on loopback through fwd,
// which sees every datagram (toServer tells its direction) and forwards it
// when it returns true.
func bastionPair(t *testing.T, fwd func(p []byte, toServer bool) bool) (client, server *Conn) {
	t.Helper()
	return bastionPairWith(t, bastionPSKConfig(), fwd)
}

// bastionPairWith is bastionPair with the listener's config srv.
func bastionPairWith(t *testing.T, srv *Config, fwd func(p []byte, toServer bool) bool) (client, server *Conn) {
	t.Helper()
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, srv)
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
	t.Cleanup(func() { _ = proxy.Close(); _ = up.Close() })
	var mu sync.Mutex
	var clientAddr *net.UDPAddr
	go func() {
		b := make([]byte, 2048)
		for {
			n, a, err := proxy.ReadFromUDP(b)
			if err != nil {
				return
			}
			mu.Lock()
			clientAddr = a
			mu.Unlock()
			if fwd(b[:n], true) {
				_, _ = up.Write(b[:n])
			}
		}
	}()
	go func() {
		b := make([]byte, 2048)
		for {
			n, err := up.Read(b)
			if err != nil {
				return
			}
			mu.Lock()
			a := clientAddr
			mu.Unlock()
			if fwd(b[:n], false) {
				_, _ = proxy.WriteToUDP(b[:n], a)
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srvc := make(chan *Conn, 1)
	srvErr := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		c := nc.(*Conn)
		if err := c.HandshakeContext(ctx); err != nil {
			srvErr <- err
			return
		}
		srvc <- c
	}()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	cfg := bastionPSKConfig()
	cfg.PSKIdentityHint = []byte("device")
	client, err = Client(pc, proxy.LocalAddr(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if err := client.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	select {
	case server = <-srvc:
	case err := <-srvErr:
		t.Fatalf("server handshake: %v", err)
	}
	t.Cleanup(func() { _ = server.Close() })
	return client, server
}

// fsmGoroutines counts goroutines running a handshake FSM.
func fsmGoroutines() int {
	var b bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
	return strings.Count(b.String(), "(*handshakeFSM).Run")
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestBastionReadHandler(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	waitFor(t, "both handshake goroutines to end", func() bool { return fsmGoroutines() == 0 })

	// Two records before the handler is set: the first waits in the
	// queue for Read, the second in the reader's send to the queue.
	for _, s := range []string{"a", "b"} {
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a record queued for Read", func() bool { return len(server.decrypted) == 1 })

	if err := server.SetReadHandler(nil); err == nil {
		t.Fatal("SetReadHandler(nil): no error")
	}
	var mu sync.Mutex
	var got []string
	var ends int
	inHandler := false
	ended := make(chan struct{})
	err := server.SetReadHandler(func(p []byte, err error) {
		mu.Lock()
		if inHandler {
			t.Error("handler called concurrently")
		}
		inHandler = true
		mu.Unlock()
		defer func() { mu.Lock(); inHandler = false; mu.Unlock() }()
		switch {
		case errors.Is(err, io.EOF):
			mu.Lock()
			ends++
			mu.Unlock()
			close(ended)
		case err != nil:
			t.Errorf("handler: unexpected error %v", err)
		default:
			mu.Lock()
			if ends > 0 {
				t.Errorf("record %q after the end", p)
			}
			got = append(got, string(p))
			mu.Unlock()
			// The handler answers on the reader's goroutine.
			if _, err := server.Write(append([]byte("echo "), p...)); err != nil {
				t.Errorf("write from handler: %v", err)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := server.SetReadHandler(func([]byte, error) {}); err == nil {
		t.Fatal("second SetReadHandler: no error")
	}
	want := []string{"a", "b"}
	for i := 0; i < 50; i++ {
		s := fmt.Sprintf("r%02d", i)
		want = append(want, s)
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
		// Echoes come back in order; reading them also paces the writes
		// so that no datagram is lost on loopback.
	}
	buf := make([]byte, 64)
	for _, w := range want {
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := client.Read(buf)
		if err != nil {
			t.Fatalf("read echo of %q: %v", w, err)
		}
		if string(buf[:n]) != "echo "+w {
			t.Fatalf("echo: got %q, want %q", buf[:n], "echo "+w)
		}
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("handler never got io.EOF after the peer closed")
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("records: got %v, want %v", got, want)
	}
	if ends != 1 {
		t.Fatalf("io.EOF delivered %d times, want 1", ends)
	}
}

// The server's last flight is lost: the client sends its last flight
// again, and the server, whose handshake goroutine has ended, answers from
// its record reader.
func TestBastionParkedServerRetransmitsLastFlight(t *testing.T) {
	var mu sync.Mutex
	dropped := 0
	client, server := bastionPair(t, func(p []byte, toServer bool) bool {
		mu.Lock()
		defer mu.Unlock()
		if !toServer && len(p) > 0 && p[0] == 20 && dropped == 0 {
			// ChangeCipherSpec + Finished: the server's last flight.
			dropped++
			return false
		}
		return true
	})
	mu.Lock()
	d := dropped
	mu.Unlock()
	if d != 1 {
		t.Fatalf("the server's last flight was dropped %d times, want 1", d)
	}
	if !server.fsm.parked.Load() {
		t.Fatal("the server's handshake goroutine did not end")
	}
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := server.Read(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("server read: %q, %v", buf[:n], err)
	}
}

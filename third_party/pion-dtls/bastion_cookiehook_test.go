// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, pion-dtls (50)):
// Conn.SetOnCookieVerified runs once the client has echoed the cookie.

package dtls

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

func TestBastionCookieVerifiedHook(t *testing.T) {
	var pskCalls atomic.Int32
	srv := bastionPSKConfig()
	srv.PSK = func([]byte) ([]byte, error) {
		pskCalls.Add(1)
		return []byte{1, 2, 3, 4, 5, 6, 7, 8}, nil
	}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// serve accepts one connection and runs its handshake with hook.
	serve := func(hook func() error, timeout time.Duration) <-chan error {
		errc := make(chan error, 1)
		go func() {
			nc, err := ln.Accept()
			if err != nil {
				errc <- err
				return
			}
			c := nc.(*Conn)
			defer c.Close()
			c.SetOnCookieVerified(hook)
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			errc <- c.HandshakeContext(ctx)
		}()
		return errc
	}
	dial := func(timeout time.Duration) error {
		c, err := Dial("udp", ln.Addr().(*net.UDPAddr), bastionPSKConfig())
		if err != nil {
			return err
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		return c.HandshakeContext(ctx)
	}

	// A ClientHello whose sender never echoes the cookie: the server
	// answers HelloVerifyRequest and the hook never runs.
	var calls atomic.Int32
	count := func() error { calls.Add(1); return nil }
	errc := serve(count, 300*time.Millisecond)
	raw, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Write(bastionClientHello(t)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2048)
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := raw.Read(b)
	if err != nil || n < 14 || b[0] != 22 || b[13] != 3 {
		t.Fatalf("answer to a ClientHello: % x %v, want a HelloVerifyRequest", b[:n], err)
	}
	if err := <-errc; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cookieless handshake ended with %v, want its context's deadline", err)
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("hook ran %d times without the cookie echoed", n)
	}

	// A real client: the hook runs once, before the PSK is looked up.
	var pskAtHook atomic.Int32
	errc = serve(func() error { pskAtHook.Store(pskCalls.Load()); return count() }, 10*time.Second)
	if err := dial(10 * time.Second); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("hook ran %d times in one handshake, want 1", n)
	}
	if pskAtHook.Load() != 0 {
		t.Fatal("the PSK callback ran before the hook")
	}

	// A hook that refuses ends the handshake with its error, before any
	// cryptographic work on the ClientHello.
	pskCalls.Store(0)
	refused := errors.New("too many handshakes from this address")
	errc = serve(func() error { return refused }, 10*time.Second)
	if err := dial(time.Second); err == nil {
		t.Fatal("client handshake succeeded although the hook refused")
	}
	if err := <-errc; !errors.Is(err, refused) {
		t.Fatalf("server handshake ended with %v, want the hook's error", err)
	}
	if n := pskCalls.Load(); n != 0 {
		t.Fatalf("PSK callback ran %d times after the hook refused", n)
	}
}

// bastionClientHello is the first datagram of a real PSK client.
func bastionClientHello(t testing.TB) []byte {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c, err := Dial("udp", pc.LocalAddr().(*net.UDPAddr), bastionPSKConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.HandshakeContext(ctx); close(done) }()
	b := make([]byte, 2048)
	_ = pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := pc.ReadFrom(b)
	cancel()
	_ = c.Close()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	return b[:n]
}

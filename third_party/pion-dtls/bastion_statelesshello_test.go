// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, pion-dtls (51)):
// Config.StatelessHelloVerify.

package dtls

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
)

func bastionStatelessConfig() *Config {
	c := bastionPSKConfig()
	c.StatelessHelloVerify = true
	return c
}

func bastionRecordSeq(b []byte) uint64 {
	return uint64(binary.BigEndian.Uint16(b[5:]))<<32 | uint64(binary.BigEndian.Uint32(b[7:]))
}

// bastionHandshake is the type and message sequence of the handshake
// message that starts datagram b.
func bastionHandshake(b []byte) (handshake.Type, uint16) {
	if len(b) < recordlayer.FixedHeaderSize+handshake.HeaderLength || b[0] != byte(protocol.ContentTypeHandshake) {
		return 0, 0
	}
	return handshake.Type(b[13]), binary.BigEndian.Uint16(b[17:])
}

// A real client and server: the HelloVerifyRequest carries the first
// ClientHello's record number, the ServerHello is handshake message 1 in
// the record number of the second ClientHello, and data flows.
func TestBastionStatelessHelloVerifyHandshake(t *testing.T) {
	var mu sync.Mutex
	var toServer, toClient [][]byte
	client, server := bastionPairWith(t, bastionStatelessConfig(), func(p []byte, up bool) bool {
		mu.Lock()
		defer mu.Unlock()
		if up {
			toServer = append(toServer, bytes.Clone(p))
		} else {
			toClient = append(toClient, bytes.Clone(p))
		}
		return true
	})
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 64)
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := server.Read(b)
	if err != nil || string(b[:n]) != "hello" {
		t.Fatalf("server read %q, %v", b[:n], err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(toServer) < 2 || len(toClient) < 2 {
		t.Fatalf("%d datagrams to the server, %d to the client", len(toServer), len(toClient))
	}
	if typ, seq := bastionHandshake(toClient[0]); typ != handshake.TypeHelloVerifyRequest || seq != 0 {
		t.Fatalf("first answer: handshake type %d message %d, want HelloVerifyRequest, 0", typ, seq)
	}
	if got, want := bastionRecordSeq(toClient[0]), bastionRecordSeq(toServer[0]); got != want {
		t.Fatalf("HelloVerifyRequest in record %d, want the ClientHello's %d", got, want)
	}
	if typ, seq := bastionHandshake(toServer[1]); typ != handshake.TypeClientHello || seq != 1 {
		t.Fatalf("second datagram: handshake type %d message %d, want ClientHello, 1", typ, seq)
	}
	if typ, seq := bastionHandshake(toClient[1]); typ != handshake.TypeServerHello || seq != 1 {
		t.Fatalf("second answer: handshake type %d message %d, want ServerHello, 1", typ, seq)
	}
	if got, want := bastionRecordSeq(toClient[1]), bastionRecordSeq(toServer[1]); got != want {
		t.Fatalf("ServerHello in record %d, want the second ClientHello's %d", got, want)
	}
}

// bastionAcceptAll accepts from ln until it is closed, counts the
// connections and runs each one's handshake (bounded) in the background.
func bastionAcceptAll(t *testing.T, ln net.Listener) (accepted *atomic.Int32, handshakes <-chan error) {
	t.Helper()
	accepted = new(atomic.Int32)
	hs := make(chan error, 64)
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				defer nc.Close()
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				select {
				case hs <- nc.(*Conn).HandshakeContext(ctx):
				default:
				}
			}()
		}
	}()
	return accepted, hs
}

// Cookieless ClientHellos from many addresses make no connection and no
// goroutine: each gets a HelloVerifyRequest and is forgotten.
func TestBastionStatelessHelloVerifyKeepsNoState(t *testing.T) {
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionStatelessConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted, _ := bastionAcceptAll(t, ln)
	hello := bastionClientHello(t)
	before := runtime.NumGoroutine()
	const sources, each = 64, 10
	var answered atomic.Int32
	var wg sync.WaitGroup
	for range sources {
		c, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			b := make([]byte, 2048)
			for range each {
				if _, err := c.Write(hello); err != nil {
					t.Error(err)
					return
				}
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				n, err := c.Read(b)
				if err != nil {
					t.Errorf("no answer to a ClientHello: %v", err)
					return
				}
				if typ, _ := bastionHandshake(b[:n]); typ != handshake.TypeHelloVerifyRequest || n != helloVerifyLen {
					t.Errorf("answer % x, want a HelloVerifyRequest of %d bytes", b[:n], helloVerifyLen)
					return
				}
				answered.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := answered.Load(); n != sources*each {
		t.Fatalf("%d of %d ClientHellos answered", n, sources*each)
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("%d connections made for ClientHellos without a cookie, want none", n)
	}
	if after := runtime.NumGoroutine(); after > before+2 {
		t.Fatalf("goroutines %d → %d after %d cookieless ClientHellos", before, after, sources*each)
	}
}

// bastionWithCookie is hello (a record with a ClientHello, message 0)
// as the client sends it again: message 1 in record 1, with cookie, and
// changed by edit.
func bastionWithCookie(t *testing.T, hello, cookie []byte, edit func(*handshake.MessageClientHello)) []byte {
	t.Helper()
	var ch handshake.MessageClientHello
	if err := ch.Unmarshal(hello[recordlayer.FixedHeaderSize+handshake.HeaderLength:]); err != nil {
		t.Fatal(err)
	}
	ch.Cookie = bytes.Clone(cookie)
	if edit != nil {
		edit(&ch)
	}
	rec := &recordlayer.RecordLayer{
		Header:  recordlayer.Header{Version: protocol.Version1_2, SequenceNumber: 1},
		Content: &handshake.Handshake{Header: handshake.Header{MessageSequence: 1}, Message: &ch},
	}
	b, err := rec.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Only the cookie made for this address and this ClientHello, within its
// lifetime, makes a connection; anything else gets a HelloVerifyRequest.
func TestBastionStatelessHelloVerifyCookie(t *testing.T) {
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionStatelessConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v := ln.(*listener).verifier
	accepted, handshakes := bastionAcceptAll(t, ln)
	hello := bastionClientHello(t)
	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	// send writes p from c and returns the type of the handshake message
	// that answers it.
	send := func(c *net.UDPConn, p []byte) (handshake.Type, []byte) {
		t.Helper()
		if _, err := c.Write(p); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 2048)
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := c.Read(b)
		if err != nil {
			t.Fatalf("no answer: %v", err)
		}
		typ, _ := bastionHandshake(b[:n])
		return typ, b[:n]
	}
	cookieOf := func(hvr []byte) []byte {
		off := recordlayer.FixedHeaderSize + handshake.HeaderLength + 3
		return hvr[off : off+helloCookieLen]
	}
	a := dial()
	typ, hvr := send(a, hello)
	if typ != handshake.TypeHelloVerifyRequest {
		t.Fatalf("answer to a ClientHello: %d", typ)
	}
	cookie := cookieOf(hvr)
	aAddr := a.LocalAddr().(*net.UDPAddr).AddrPort()
	var ch handshake.MessageClientHello
	if err := ch.Unmarshal(hello[recordlayer.FixedHeaderSize+handshake.HeaderLength:]); err != nil {
		t.Fatal(err)
	}
	sum, err := clientHelloNegotiationHash(&ch)
	if err != nil {
		t.Fatal(err)
	}
	otherHost, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: int(aAddr.Port())}, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer otherHost.Close()
	now := uint32(time.Now().Unix())
	expired := v.cookieAt(now-helloCookieLifetime-2, aAddr, &sum)
	future := v.cookieAt(now+5, aAddr, &sum)
	flipped := bytes.Clone(cookie)
	flipped[len(flipped)-1] ^= 1
	for _, tc := range []struct {
		name string
		from *net.UDPConn
		p    []byte
	}{
		{"another port", dial(), bastionWithCookie(t, hello, cookie, nil)},
		{"another host, same port", otherHost, bastionWithCookie(t, hello, cookie, nil)},
		{"another ClientHello", a, bastionWithCookie(t, hello, cookie, func(h *handshake.MessageClientHello) {
			h.CipherSuiteIDs = append(h.CipherSuiteIDs, uint16(TLS_PSK_WITH_AES_128_GCM_SHA256))
		})},
		{"a changed cookie", a, bastionWithCookie(t, hello, flipped, nil)},
		{"an expired cookie", a, bastionWithCookie(t, hello, expired[:], nil)},
		{"a cookie from the future", a, bastionWithCookie(t, hello, future[:], nil)},
		{"a truncated cookie", a, bastionWithCookie(t, hello, cookie[:helloCookieLen-1], nil)},
	} {
		if typ, _ := send(tc.from, tc.p); typ != handshake.TypeHelloVerifyRequest {
			t.Fatalf("%s: answered with handshake type %d, want a HelloVerifyRequest", tc.name, typ)
		}
		if n := accepted.Load(); n != 0 {
			t.Fatalf("%s: a connection was made", tc.name)
		}
	}
	// The cookie as given, from its address: a connection, whose handshake
	// answers with a ServerHello.
	if typ, _ := send(a, bastionWithCookie(t, hello, cookie, nil)); typ != handshake.TypeServerHello {
		t.Fatalf("valid cookie: answered with handshake type %d, want a ServerHello", typ)
	}
	if n := accepted.Load(); n != 1 {
		t.Fatalf("valid cookie: %d connections made, want 1", n)
	}
	_ = a.Close()
	<-handshakes // ends without the client's next flight
}

// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, pion-dtls (51)):
// Config.StatelessHelloVerify.

package dtls

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
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

// bastionFirst is the first datagram in ds that starts with a handshake
// message of type typ and sequence number seq, and its index; -1 if none.
func bastionFirst(ds [][]byte, typ handshake.Type, seq uint16) ([]byte, int) {
	for i, d := range ds {
		if t, s := bastionHandshake(d); t == typ && s == seq {
			return d, i
		}
	}
	return nil, -1
}

// bastionStatelessExchange runs a real client against a stateless
// listener through a proxy that records every datagram and may change
// those to the client (edit), writes one message, and returns what went
// each way.
func bastionStatelessExchange(t *testing.T, edit func(p []byte)) (toServer, toClient [][]byte) {
	t.Helper()
	var mu sync.Mutex
	client, server := bastionPairWith(t, bastionStatelessConfig(), func(p []byte, up bool) bool {
		mu.Lock()
		defer mu.Unlock()
		if up {
			toServer = append(toServer, bytes.Clone(p))
		} else {
			if edit != nil {
				edit(p)
			}
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
	return toServer, toClient
}

// A real client and server: a HelloVerifyRequest carries the record
// number of the ClientHello it answers, the ServerHello is handshake
// message 1 in the record number of the second ClientHello, and data
// flows. (The client retransmits after 50 ms, so on a loaded machine a
// flight may be sent twice: each is looked up by what it is.)
func TestBastionStatelessHelloVerifyHandshake(t *testing.T) {
	toServer, toClient := bastionStatelessExchange(t, nil)
	hvr, _ := bastionFirst(toClient, handshake.TypeHelloVerifyRequest, 0)
	if hvr == nil {
		t.Fatal("no HelloVerifyRequest with message sequence 0")
	}
	answered := false
	for _, d := range toServer {
		if typ, seq := bastionHandshake(d); typ == handshake.TypeClientHello && seq == 0 && bastionRecordSeq(d) == bastionRecordSeq(hvr) {
			answered = true
		}
	}
	if !answered {
		t.Fatalf("HelloVerifyRequest in record %d, the number of no first ClientHello", bastionRecordSeq(hvr))
	}
	ch2, _ := bastionFirst(toServer, handshake.TypeClientHello, 1)
	sh, _ := bastionFirst(toClient, handshake.TypeServerHello, 1)
	if ch2 == nil || sh == nil {
		t.Fatalf("second ClientHello %v, ServerHello as message 1 %v", ch2 != nil, sh != nil)
	}
	if got, want := bastionRecordSeq(sh), bastionRecordSeq(ch2); got != want {
		t.Fatalf("ServerHello in record %d, want the second ClientHello's %d", got, want)
	}
}

// A client that echoes a cookie the listener no longer takes (here: the
// proxy changed the first HelloVerifyRequest's) gets a second
// HelloVerifyRequest numbered as its second ClientHello, takes it as the
// next message, and the handshake goes on with a third ClientHello and a
// ServerHello numbered 2. With every HelloVerifyRequest numbered 0 (as
// OpenSSL's listener does) the client drops the second one as a
// retransmission and the handshake stalls.
func TestBastionStatelessHelloVerifyStaleCookie(t *testing.T) {
	changed := false
	toServer, toClient := bastionStatelessExchange(t, func(p []byte) {
		if typ, _ := bastionHandshake(p); typ == handshake.TypeHelloVerifyRequest && !changed {
			p[len(p)-1] ^= 1
			changed = true
		}
	})
	if hvr, _ := bastionFirst(toClient, handshake.TypeHelloVerifyRequest, 1); hvr == nil {
		t.Fatal("no second HelloVerifyRequest numbered 1")
	}
	ch3, _ := bastionFirst(toServer, handshake.TypeClientHello, 2)
	sh, _ := bastionFirst(toClient, handshake.TypeServerHello, 2)
	if ch3 == nil || sh == nil {
		t.Fatalf("third ClientHello %v, ServerHello as message 2 %v", ch3 != nil, sh != nil)
	}
	if got, want := bastionRecordSeq(sh), bastionRecordSeq(ch3); got != want {
		t.Fatalf("ServerHello in record %d, want the third ClientHello's %d", got, want)
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
	// The senders' goroutines end after wg.Done: wait for them, bounded.
	after := runtime.NumGoroutine()
	for deadline := time.Now().Add(2 * time.Second); after > before+2 && time.Now().Before(deadline); after = runtime.NumGoroutine() {
		time.Sleep(10 * time.Millisecond)
	}
	if after > before+2 {
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
	_, sum, ok := helloFields(hello[recordlayer.FixedHeaderSize+handshake.HeaderLength:])
	if !ok {
		t.Fatal("the ClientHello's fields do not parse")
	}
	// The cookie the listener made is the one these would make now.
	if c := v.cookieAt(binary.BigEndian.Uint32(cookie), aAddr, &sum); !bytes.Equal(c[:], cookie) {
		t.Fatalf("cookie % x, want % x", cookie, c)
	}
	otherHost, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: int(aAddr.Port())}, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer otherHost.Close()
	now := v.seconds()
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

// bastionFragments cuts the ClientHello in record (one record, one whole
// message) into two fragments, the first ending at cut bytes of the body,
// each in a record of its own (record numbers seq, seq+1).
func bastionFragments(record []byte, cut int, seq uint64) (first, second []byte) {
	h := record[recordlayer.FixedHeaderSize:]
	body := h[handshake.HeaderLength:]
	frag := func(off int, data []byte, rseq uint64) []byte {
		out := make([]byte, 0, recordlayer.FixedHeaderSize+handshake.HeaderLength+len(data))
		out = append(out, record[:5]...) // type, version, epoch
		out = append(out, byte(rseq>>40), byte(rseq>>32), byte(rseq>>24), byte(rseq>>16), byte(rseq>>8), byte(rseq))
		out = binary.BigEndian.AppendUint16(out, uint16(handshake.HeaderLength+len(data)))
		out = append(out, h[:6]...) // type, length, message sequence
		out = append(out, byte(off>>16), byte(off>>8), byte(off))
		out = append(out, byte(len(data)>>16), byte(len(data)>>8), byte(len(data)))
		return append(out, data...)
	}
	return frag(0, body[:cut], seq), frag(cut, body[cut:], seq+1)
}

// bastionFieldsEnd is where a ClientHello body's compression methods end.
func bastionFieldsEnd(body []byte) int {
	p := 2 + handshake.RandomLength
	p += 1 + int(body[p])                           // session ID
	p += 1 + int(body[p])                           // cookie
	p += 2 + int(binary.BigEndian.Uint16(body[p:])) // cipher suites
	return p + 1 + int(body[p])                     // compression methods
}

// A fragmented ClientHello is answered, and admitted, from its first
// fragment when that holds the fields up to the compression methods; the
// handshake reassembles the rest on the connection. A first fragment
// without them, or a later fragment from an address without a
// connection, is dropped.
func TestBastionStatelessHelloVerifyFragments(t *testing.T) {
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionStatelessConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted, handshakes := bastionAcceptAll(t, ln)
	hello := bastionClientHello(t)
	end := bastionFieldsEnd(hello[recordlayer.FixedHeaderSize+handshake.HeaderLength:])
	dial := func() *net.UDPConn {
		c, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	// answer sends p from c and returns the handshake type answering it,
	// 0 when nothing comes within wait.
	answer := func(c *net.UDPConn, p []byte, wait time.Duration) (handshake.Type, []byte) {
		t.Helper()
		if _, err := c.Write(p); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 2048)
		_ = c.SetReadDeadline(time.Now().Add(wait))
		n, err := c.Read(b)
		if err != nil {
			return 0, nil
		}
		typ, _ := bastionHandshake(b[:n])
		return typ, b[:n]
	}
	first, second := bastionFragments(hello, end, 0)
	if typ, _ := answer(dial(), second, 300*time.Millisecond); typ != 0 {
		t.Fatalf("a later fragment from a new address answered with type %d", typ)
	}
	short, _ := bastionFragments(hello, end-1, 0)
	if typ, _ := answer(dial(), short, 300*time.Millisecond); typ != 0 {
		t.Fatalf("a first fragment without the compression methods answered with type %d", typ)
	}
	a := dial()
	typ, hvr := answer(a, first, 2*time.Second)
	if typ != handshake.TypeHelloVerifyRequest {
		t.Fatalf("first fragment of a ClientHello answered with type %d, want a HelloVerifyRequest", typ)
	}
	off := recordlayer.FixedHeaderSize + handshake.HeaderLength + 3
	withCookie := bastionWithCookie(t, hello, hvr[off:off+helloCookieLen], nil)
	end2 := bastionFieldsEnd(withCookie[recordlayer.FixedHeaderSize+handshake.HeaderLength:])
	first2, second2 := bastionFragments(withCookie, end2+3, 1)
	if typ, _ := answer(a, first2, 300*time.Millisecond); typ != 0 {
		t.Fatalf("first fragment with the cookie answered with type %d before the rest came", typ)
	}
	if n := accepted.Load(); n != 1 {
		t.Fatalf("%d connections after the first fragment with the cookie, want 1", n)
	}
	if typ, _ := answer(a, second2, 2*time.Second); typ != handshake.TypeServerHello {
		t.Fatalf("whole ClientHello with the cookie answered with type %d, want a ServerHello", typ)
	}
	_ = a.Close()
	<-handshakes
}

// The handshake checks the cookie again, a moment after the listener let
// its ClientHello through: a cookie the listener took when 29 s old is
// still taken there at 45 s (helloCookieGrace), or the handshake would
// fail with AccessDenied for a client that did nothing wrong.
func TestBastionStatelessHelloVerifyGrace(t *testing.T) {
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, bastionStatelessConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v := ln.(*listener).verifier
	hello := bastionClientHello(t)
	_, sum, ok := helloFields(hello[recordlayer.FixedHeaderSize+handshake.HeaderLength:])
	if !ok {
		t.Fatal("the ClientHello's fields do not parse")
	}
	c, err := net.DialUDP("udp", nil, ln.Addr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cookie := v.cookieAt(v.seconds(), c.LocalAddr().(*net.UDPAddr).AddrPort(), &sum)
	// The listener's check sees the cookie 29 s old, every later one 45 s.
	// Set before any datagram reaches the listener: its read loop reads
	// now only for one (these tests run without -race, see
	// scripts/test.d/third-party.sh).
	var calls atomic.Int32
	start := time.Now()
	v.now = func() time.Time {
		if calls.Add(1) == 1 {
			return start.Add(29 * time.Second)
		}
		return start.Add(45 * time.Second)
	}
	// No deadline: a loaded machine may take its time to the ServerHello.
	hsCtx, hsCancel := context.WithCancel(context.Background())
	defer hsCancel()
	errc := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			errc <- err
			return
		}
		defer nc.Close()
		errc <- nc.(*Conn).HandshakeContext(hsCtx)
	}()
	if _, err := c.Write(bastionWithCookie(t, hello, cookie[:], nil)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2048)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, err := c.Read(b)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	if typ, _ := bastionHandshake(b[:n]); typ != handshake.TypeServerHello {
		t.Fatalf("answered with handshake type %d (content type %d), want a ServerHello", typ, b[0])
	}
	// The ServerHello shows the second check took the cookie; the
	// handshake then waits for the client's next flight until cancelled.
	hsCancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("server handshake ended with %v, want it cancelled", err)
	}
}

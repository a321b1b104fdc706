// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patch (third_party/README.md, pion-dtls (18)): a
// server connection of the listener runs its handshake on the calling
// goroutine, reading the client's flights itself.

package dtls

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/pion/logging"
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

// quietLogs hands every connection one logger that drops everything and
// says so (TraceEnabled), as Bastion's shared DTLS logger does.
type quietLogs struct{}

type quietLogger struct{ logging.LeveledLogger }

func (quietLogs) NewLogger(string) logging.LeveledLogger {
	f := logging.NewDefaultLoggerFactory()
	f.DefaultLogLevel = logging.LogLevelDisabled
	return quietLogger{f.NewLogger("dtls")}
}

func (quietLogger) TraceEnabled() bool { return false }

// BenchmarkBastionServerHandshake: full PSK handshakes (cookie, extended
// master secret, connection ID) of a client against a listener, closed by
// the client, as bridges/bench's handshake load does. Allocations and
// time are both ends'; the memory profile focused on the server's
// functions (-focus 'handshakeInline|readRecords|listener') shows the
// server's part:
//
//	cd third_party && go test -run '^$' -bench BastionServerHandshake -benchmem ./pion-dtls/
func BenchmarkBastionServerHandshake(b *testing.B) {
	logs := quietLogs{}.NewLogger("dtls")
	cfg := bastionPSKConfig()
	cfg.FlightInterval = time.Second
	cfg.ExtendedMasterSecret = RequireExtendedMasterSecret
	cfg.ConnectionIDGenerator = RandomCIDGenerator(8)
	cfg.LoggerFactory = sharedLogs{logs}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, cfg)
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := nc.(*Conn)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if c.HandshakeContext(ctx) == nil {
					_, _ = c.Read(make([]byte, 64)) // until the client's close_notify
				}
				_ = c.Close()
			}()
		}
	}()
	ccfg := bastionPSKConfig()
	ccfg.FlightInterval = time.Second
	ccfg.ConnectionIDGenerator = OnlySendCIDGenerator()
	ccfg.LoggerFactory = sharedLogs{logs}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := Dial("udp", ln.Addr().(*net.UDPAddr), ccfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.HandshakeContext(context.Background()); err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
	}
}

// BenchmarkBastionServerHandshakeInline is BenchmarkBastionServerHandshake
// with the server as Bastion's gateway runs it (otacache.ServeDTLS): after
// the handshake the session's records go to an inline read handler, so
// the client's close_notify is answered on the listener's read loop; each
// iteration waits for the server's end of the session.
//
//	cd third_party && go test -run '^$' -bench BastionServerHandshakeInline -benchmem ./pion-dtls/
func BenchmarkBastionServerHandshakeInline(b *testing.B) {
	logs := quietLogs{}.NewLogger("dtls")
	cfg := bastionPSKConfig()
	cfg.FlightInterval = time.Second
	cfg.ExtendedMasterSecret = RequireExtendedMasterSecret
	cfg.ConnectionIDGenerator = RandomCIDGenerator(8)
	cfg.LoggerFactory = sharedLogs{logs}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, cfg)
	if err != nil {
		b.Fatal(err)
	}
	ended := make(chan error, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			c := nc.(*Conn)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err = c.HandshakeContext(ctx)
			cancel()
			if err != nil {
				_ = c.Close()
				ended <- err
				continue
			}
			if err := c.SetInlineReadHandler(func(_ []byte, err error) {
				if errors.Is(err, io.EOF) {
					ended <- nil
				} else if err != nil {
					_ = c.Close()
				}
			}); err != nil {
				_ = c.Close()
				ended <- err
			}
		}
	}()
	ccfg := bastionPSKConfig()
	ccfg.FlightInterval = time.Second
	ccfg.ConnectionIDGenerator = OnlySendCIDGenerator()
	ccfg.LoggerFactory = sharedLogs{logs}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		c, err := Dial("udp", ln.Addr().(*net.UDPAddr), ccfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.HandshakeContext(context.Background()); err != nil {
			b.Fatal(err)
		}
		_ = c.Close()
		if err := <-ended; err != nil {
			b.Fatal(err)
		}
	}
}

type sharedLogs struct{ l logging.LeveledLogger }

func (s sharedLogs) NewLogger(string) logging.LeveledLogger { return s.l }

// handshakeRecordBytes is one handshake record holding fragments of a
// message of type typ, sequence seq and length length, as a peer sends it.
func handshakeRecordBytes(epoch uint16, typ handshake.Type, seq uint16, length uint32, frags ...[2]int) []byte {
	msg := make([]byte, length)
	for i := range msg {
		msg[i] = byte(i*31 + int(seq))
	}
	var body []byte
	for _, f := range frags {
		h := handshake.Header{Type: typ, Length: length, MessageSequence: seq,
			FragmentOffset: uint32(f[0]), FragmentLength: uint32(f[1] - f[0])} //nolint:gosec
		hb, _ := h.Marshal()
		body = append(append(body, hb...), msg[f[0]:f[1]]...)
	}
	rh := recordlayer.Header{ContentType: protocol.ContentTypeHandshake, Version: protocol.Version1_2,
		Epoch: epoch, ContentLen: uint16(len(body))} //nolint:gosec
	rb, _ := rh.Marshal()
	return append(rb, body...)
}

// A message that comes in one fragment (kept as it came, patch (19))
// pops as the same bytes as the message put together from fragments, the
// buffer's accounting returns to zero, and a later fragment of the same
// message changes nothing.
func TestBastionFragmentBufferWholeMessage(t *testing.T) {
	for _, length := range []uint32{1, 40, 300} {
		whole := newFragmentBuffer()
		if _, _, err := whole.push(handshakeRecordBytes(1, handshake.TypeClientHello, 0, length, [2]int{0, int(length)})); err != nil {
			t.Fatal(err)
		}
		if whole.totalFragmentCount != 1 || whole.size() != int(length) {
			t.Fatalf("len %d: %d fragments, %d bytes buffered; want 1, %d", length, whole.totalFragmentCount, whole.size(), length)
		}
		// A retransmission cut differently, before the message is popped.
		if length > 1 {
			if _, rtx, err := whole.push(handshakeRecordBytes(1, handshake.TypeClientHello, 0, length,
				[2]int{0, 1}, [2]int{1, int(length)})); err != nil || rtx {
				t.Fatalf("len %d: second push: retransmit %v, %v", length, rtx, err)
			}
		}
		got, gotEpoch := whole.pop()

		cut := newFragmentBuffer()
		half := int(length) / 2
		if _, _, err := cut.push(handshakeRecordBytes(1, handshake.TypeClientHello, 0, length, [2]int{half, int(length)})); err != nil {
			t.Fatal(err)
		}
		if _, _, err := cut.push(handshakeRecordBytes(1, handshake.TypeClientHello, 0, length, [2]int{0, half})); err != nil {
			t.Fatal(err)
		}
		want, wantEpoch := cut.pop()
		if want == nil || !bytes.Equal(got, want) || gotEpoch != wantEpoch {
			t.Fatalf("len %d: popped %x (epoch %d), want %x (epoch %d)", length, got, gotEpoch, want, wantEpoch)
		}
		if whole.totalFragmentCount != 0 || whole.size() != 0 || len(whole.cache) != 0 {
			t.Fatalf("len %d: after pop %d fragments, %d bytes, %d messages buffered", length, whole.totalFragmentCount, whole.size(), len(whole.cache))
		}
		// Kept as it came, in the entry the last whole message popped
		// left (patch (38)): one allocation, the copy of the message that
		// push keeps (patch (55); handleIncomingPacket copied the record
		// before), where the fragment ranges and the rebuilt message took
		// four, and a new entry one.
		msg := handshakeRecordBytes(1, handshake.TypeClientHello, 1, length, [2]int{0, int(length)})
		if n := testing.AllocsPerRun(50, func() {
			if _, _, err := whole.push(msg); err != nil {
				t.Fatal(err)
			}
			if out, _ := whole.pop(); out == nil {
				t.Fatal("nothing popped")
			}
			whole.currentMessageSequenceNumber--
		}); n > 1 {
			t.Errorf("len %d: %v allocations to push and pop a whole message, want 1", length, n)
		}
		whole.currentMessageSequenceNumber++
		if next, _ := whole.pop(); next != nil {
			t.Fatalf("len %d: second pop %x", length, next)
		}
		// A retransmission after the pop is recognised as one and kept out.
		if _, rtx, err := whole.push(handshakeRecordBytes(1, handshake.TypeClientHello, 0, length, [2]int{0, int(length)})); err != nil || !rtx || len(whole.cache) != 0 {
			t.Fatalf("len %d: retransmission after pop: retransmit %v, %d buffered, %v", length, rtx, len(whole.cache), err)
		}
	}
}

// handshakeRecord (one fragment, no connection ID) writes the bytes of
// processHandshakePacket, sets the same record header and takes the same
// sequence numbers, in the clear and encrypted.
func TestBastionHandshakeRecordMatchesFragmenting(t *testing.T) {
	master := bytes.Repeat([]byte{0x42}, 48)
	clientRandom := bytes.Repeat([]byte{0x01}, 32)
	serverRandom := bytes.Repeat([]byte{0x02}, 32)
	newConn := func(id CipherSuiteID, seq uint64) *Conn {
		c := &Conn{maximumTransmissionUnit: defaultMTU}
		cs := cipherSuiteForID(id, nil)
		if err := cs.Init(master, clientRandom, serverRandom, false); err != nil {
			t.Fatal(err)
		}
		c.state.cipherSuite = cs
		c.state.localSequenceNumber = []uint64{seq, seq}
		return c
	}
	for _, id := range []CipherSuiteID{TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256} {
		for _, epoch := range []uint16{0, 1} {
			for _, size := range []int{0, 12, 100, defaultMTU} {
				for _, seq := range []uint64{0, 5, recordlayer.MaxSequenceNumber} {
					name := fmt.Sprintf("%v/epoch=%d/len=%d/seq=%d", id, epoch, size, seq)
					newPkt := func() (*packet, *handshake.Handshake) {
						hs := &handshake.Handshake{Header: handshake.Header{MessageSequence: 3},
							Message: &handshake.MessageFinished{VerifyData: bytes.Repeat([]byte{7}, size)}}
						return &packet{
							record:        &recordlayer.RecordLayer{Header: recordlayer.Header{Epoch: epoch, Version: protocol.Version1_2}, Content: hs},
							shouldEncrypt: epoch > 0,
						}, hs
					}
					cw := newConn(id, seq)
					pw, hw := newPkt()
					raw, err := hw.Marshal()
					if err != nil {
						t.Fatal(err)
					}
					pw.record.Header.ContentType = protocol.ContentTypeHandshake
					want, wantErr := cw.processHandshakePacket(pw, hw, raw[handshake.HeaderLength:])

					cg := newConn(id, seq)
					pg, hg := newPkt()
					raw, _ = hg.Marshal()
					pg.record.Header.ContentType = protocol.ContentTypeHandshake
					got, gotErr := cg.handshakeRecord(pg, raw)
					if (wantErr != nil) != (gotErr != nil) {
						t.Fatalf("%s: error %v, want %v", name, gotErr, wantErr)
					}
					if !slices.EqualFunc(want, got, bytes.Equal) {
						t.Fatalf("%s: records differ:\nwant %x\ngot  %x", name, want, got)
					}
					if fmt.Sprint(pw.record.Header) != fmt.Sprint(pg.record.Header) && wantErr == nil {
						t.Fatalf("%s: record header %+v, want %+v", name, pg.record.Header, pw.record.Header)
					}
					if !slices.Equal(cw.state.localSequenceNumber, cg.state.localSequenceNumber) {
						t.Fatalf("%s: sequence numbers %v, want %v", name, cg.state.localSequenceNumber, cw.state.localSequenceNumber)
					}
					if epoch == 0 && wantErr == nil {
						// The record and the slice that holds it.
						if n := testing.AllocsPerRun(20, func() {
							cg.state.localSequenceNumber[0] = seq
							_, _ = cg.handshakeRecord(pg, raw)
						}); n > 2 {
							t.Errorf("%s: %v allocations, want at most 2", name, n)
						}
					}
				}
			}
		}
	}
}

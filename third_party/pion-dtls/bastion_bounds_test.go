// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

// Tests of the Bastion patches (55), (57) and (58) (third_party/README.md):
// what a peer can make a connection's fragment buffer hold is bounded, and
// the buffer keeps copies of its fragments, never the records they came in;
// so is what the handshake cache keeps, and the records that wait for the
// handshake's keys.

package dtls

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/pion/logging"
)

// fragmentBufferRetained is what f's fragments keep reachable: the
// capacity of each slice it holds, from where the slice starts. A
// fragment that is a slice of the record it came in keeps (at least) the
// rest of that record.
func fragmentBufferRetained(f *fragmentBuffer) int {
	n := 0
	for _, m := range f.cache {
		n += cap(m.whole)
		for _, r := range m.ranges {
			n += cap(r.data)
		}
	}

	return n
}

// handshakeRecordOf is a record of epoch 0 holding body, handshake
// fragments.
func handshakeRecordOf(body []byte) []byte {
	h := recordlayer.Header{
		ContentType: protocol.ContentTypeHandshake,
		Version:     protocol.Version1_2,
		ContentLen:  uint16(len(body)), //nolint:gosec // G115: test records are below 16 KiB.
	}
	b, _ := h.Marshal()

	return append(b, body...)
}

// oneByteFragmentRecord is a record of about 8 KiB that holds a fragment
// of one byte of the 2-byte message msgSeq, then the same fragment again
// and again: all but the first are covered by it, so the buffer keeps one
// byte of the record (pion kept the record).
func oneByteFragmentRecord(msgSeq uint16) []byte {
	frag := handshakeFragment(handshake.TypeClientKeyExchange, msgSeq, 2, 0, 1)

	return bytes.Repeat(frag, 8000/len(frag))
}

// bigFragment is a fragment of 7,900 bytes at the i-th place of one of
// three messages of 1 MiB from msgSeq on: no two cover each other.
func bigFragment(msgSeq uint16, i int) []byte {
	return handshakeFragment(handshake.TypeClientKeyExchange, msgSeq+uint16(i%3), //nolint:gosec // G115
		1<<20, uint32(i)*8000, 7900) //nolint:gosec // G115
}

// TestBastionFragmentBufferBound: fragments of messages to come, pushed
// past the bound, are refused once the buffer holds fragmentBufferMaxHeld,
// and what the buffer keeps reachable stays within it: pion kept each
// fragment's record (one byte of a fragment kept an 8 KiB record) and
// bounded the fragments' bytes at 2 MB.
func TestBastionFragmentBufferBound(t *testing.T) {
	cases := []struct {
		name   string
		n      int
		record func(i int) []byte
	}{
		{"one byte in each 8 KiB record", 600, func(i int) []byte {
			return handshakeRecordOf(oneByteFragmentRecord(uint16(1 + i))) //nolint:gosec // G115
		}},
		{"8 KiB fragments", 40, func(i int) []byte { return handshakeRecordOf(bigFragment(1, i)) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFragmentBuffer()
			refused := 0
			for i := range tc.n {
				_, _, err := f.push(tc.record(i))
				switch {
				case errors.Is(err, errFragmentBufferOverflow):
					refused++
				case err != nil:
					t.Fatalf("record %d: %v", i, err)
				}
				if held, kept := f.held(), fragmentBufferRetained(f); held > fragmentBufferMaxHeld || kept > fragmentBufferMaxHeld {
					t.Fatalf("after record %d: the buffer holds %d bytes (as it counts them) and keeps %d reachable, want at most %d",
						i, held, kept, fragmentBufferMaxHeld)
				}
			}
			if refused == 0 {
				t.Errorf("no record of %d refused", tc.n)
			}
			t.Logf("%d records, %d refused; %d fragments, %d bytes held", tc.n, refused, f.totalFragmentCount, f.held())
		})
	}
}

// TestBastionFragmentBufferWholeFlight: a flight of 48 KiB (a
// certificate chain in fragments of 1,000 bytes, then two small
// messages) whose first fragment arrives last waits in the buffer whole,
// then pops in order, message for message; and the buffer keeps copies:
// the records it was given can be overwritten at once.
func TestBastionFragmentBufferWholeFlight(t *testing.T) {
	const certLen, fragLen = 48 << 10, 1000
	cert := handshakeRecordBytes(0, handshake.TypeCertificate, 1, certLen, [2]int{0, certLen})
	messages := [][]byte{
		cert[recordlayer.FixedHeaderSize:],
		handshakeRecordBytes(0, handshake.TypeClientKeyExchange, 2, 66, [2]int{0, 66})[recordlayer.FixedHeaderSize:],
		handshakeRecordBytes(0, handshake.TypeCertificateVerify, 3, 72, [2]int{0, 72})[recordlayer.FixedHeaderSize:],
	}
	var records [][]byte
	for off := 0; off < certLen; off += fragLen {
		records = append(records, handshakeRecordBytes(0, handshake.TypeCertificate, 1, certLen, [2]int{off, min(off+fragLen, certLen)}))
	}
	records = append(records[1:], handshakeRecordOf(messages[1]), handshakeRecordOf(messages[2]), records[0])

	f := newFragmentBuffer()
	f.currentMessageSequenceNumber = 1
	var got [][]byte
	for i, r := range records {
		if _, _, err := f.push(r); err != nil {
			t.Fatalf("record %d of %d: %v (the buffer holds %d bytes)", i, len(records), err, f.held())
		}
		for j := range r {
			r[j] = 0xee // the caller's buffer, reused
		}
		if i == len(records)-2 {
			t.Logf("the flight but its first fragment: %d bytes held", f.held())
		}
		for out, _ := f.pop(); out != nil; out, _ = f.pop() {
			got = append(got, out)
		}
	}
	if len(got) != len(messages) {
		t.Fatalf("%d messages popped, want %d", len(got), len(messages))
	}
	for i := range messages {
		if !bytes.Equal(got[i], messages[i]) {
			t.Errorf("message %d: popped %d bytes that differ from the %d sent", i, len(got[i]), len(messages[i]))
		}
	}
	if f.held() != 0 || len(f.cache) != 0 {
		t.Errorf("after the flight the buffer holds %d bytes in %d messages, want none", f.held(), len(f.cache))
	}
}

// paddedCertificate is a self-signed certificate for key whose subject
// alternative names make it about size bytes long.
func paddedCertificate(t *testing.T, key *ecdsa.PrivateKey, cn string, size int) []byte {
	t.Helper()
	names := []string{cn}
	for i := 0; i < size/28; i++ {
		names = append(names, fmt.Sprintf("name-%05d.%s.padding.test", i, cn))
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: cn},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}

	return der
}

// bigChain is a client certificate chain of about size bytes in four
// certificates (the peer's are not verified: RequireAnyClientCert).
func bigChain(t *testing.T, size int) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var chain [][]byte
	for i := range 4 {
		chain = append(chain, paddedCertificate(t, key, fmt.Sprintf("c%d", i), size/4))
	}

	return tls.Certificate{Certificate: chain, PrivateKey: key}
}

// holdBackConn is a client's socket that holds back the datagram that
// starts its certificate flight (the first fragment of its Certificate)
// until the rest of the flight, up to its Finished, has been sent; then
// it calls release and sends it. Only once.
type holdBackConn struct {
	*net.UDPConn
	release func()

	mu   sync.Mutex
	held []byte
	done bool
}

func (c *holdBackConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.done && c.held == nil && startsCertificate(b) {
		c.held = append([]byte(nil), b...)

		return len(b), nil
	}
	n, err := c.UDPConn.WriteTo(b, addr)
	if err != nil || c.held == nil || !hasRecord(b, protocol.ContentTypeHandshake, 1) {
		return n, err
	}
	c.release()
	_, err = c.UDPConn.WriteTo(c.held, addr)
	c.held, c.done = nil, true

	return n, err
}

// startsCertificate reports whether datagram b starts with the first
// fragment of a Certificate, in epoch 0.
func startsCertificate(b []byte) bool {
	const h = recordlayer.FixedHeaderSize
	if len(b) < h+handshake.HeaderLength || protocol.ContentType(b[0]) != protocol.ContentTypeHandshake || b[3] != 0 || b[4] != 0 {
		return false
	}
	var hh handshake.Header
	if err := hh.Unmarshal(b[h:]); err != nil {
		return false
	}

	return hh.Type == handshake.TypeCertificate && hh.FragmentOffset == 0
}

// sealedRecord is a record of epoch 1 of type typ holding body, as c
// would seal it, with c's next sequence number.
func sealedRecord(t *testing.T, c *Conn, typ protocol.ContentType, body []byte) []byte {
	t.Helper()
	seq, err := c.nextLocalSequenceNumber(1)
	if err != nil {
		t.Fatal(err)
	}
	h := recordlayer.Header{
		ContentType:    typ,
		Version:        protocol.Version1_2,
		Epoch:          1,
		SequenceNumber: seq,
		ContentLen:     uint16(len(body)), //nolint:gosec // G115: test records are below 16 KiB.
	}
	raw, err := h.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.state.cipherSuite.Encrypt(&recordlayer.RecordLayer{Header: h}, append(raw, body...))
	if err != nil {
		t.Fatal(err)
	}

	return out
}

// TestBastionFragmentFloodAfterLargeChain: a client with a certificate
// chain of 41 KiB, whose certificate flight's first fragment reaches the
// server last (so that the server holds the rest of the flight in its
// fragment buffer until then), completes its handshake; then, with the
// session's keys, it sends fragments of handshake messages that never
// come: one byte in each of 100 records of 8 KiB, and 40 fragments of
// 7,900 bytes. The server keeps at most fragmentBufferMaxHeld of them
// (pion: every record of the first kind, 800 KiB, and 316,000 bytes of
// the second; since patch (60) none), tells OnFragmentDropped of the
// rest, and the session goes on: echoes come back between the bursts and
// after them.
func TestBastionFragmentFloodAfterLargeChain(t *testing.T) {
	serverKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serverDER := paddedCertificate(t, serverKey, "bastion.test", 0)
	serverCert, err := x509.ParseCertificate(serverDER)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(serverCert)
	var droppedRecords atomic.Int64
	var droppedFrom atomic.Value // netip.AddrPort
	srvCfg := &Config{
		Certificates:         []tls.Certificate{{Certificate: [][]byte{serverDER}, PrivateKey: serverKey}},
		CipherSuites:         []CipherSuiteID{TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8},
		ClientAuth:           RequireAnyClientCert,
		ExtendedMasterSecret: RequireExtendedMasterSecret,
		FlightInterval:       time.Second,
		OnFragmentDropped: func(from netip.AddrPort, _ int) {
			droppedRecords.Add(1)
			droppedFrom.Store(from)
		},
	}
	chain := bigChain(t, 40<<10)
	chainLen := 0
	for _, c := range chain.Certificate {
		chainLen += len(c)
	}
	ln, err := Listen("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}, srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var accepted atomic.Pointer[Conn]
	srvErr := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			srvErr <- err

			return
		}
		c := nc.(*Conn) //nolint:forcetypeassert
		accepted.Store(c)
		srvErr <- c.HandshakeContext(ctx)
	}()
	serverHeld := func() int {
		c := accepted.Load()
		if c == nil {
			return 0
		}
		c.procMu.Lock()
		defer c.procMu.Unlock()

		return c.fragmentBuffer.held()
	}
	var heldAtRelease atomic.Int64
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	sock := &holdBackConn{UDPConn: pc, release: func() {
		// The server has everything of the flight but its first
		// fragment (and its ChangeCipherSpec and Finished, which wait
		// for the keys) in its fragment buffer.
		waitFor(t, "the server to buffer the certificate flight", func() bool { return serverHeld() >= chainLen-2000 })
		heldAtRelease.Store(int64(serverHeld()))
	}}
	client, err := Client(sock, ln.Addr(), &Config{
		Certificates:         []tls.Certificate{chain},
		CipherSuites:         []CipherSuiteID{TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8},
		ExtendedMasterSecret: RequireExtendedMasterSecret,
		RootCAs:              roots,
		ServerName:           "bastion.test",
		FlightInterval:       time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	if err := client.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-srvErr; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	server := accepted.Load()
	t.Cleanup(func() { _ = server.Close() })
	t.Logf("certificate chain %d bytes; the server held %d bytes of the flight before its first fragment came",
		chainLen, heldAtRelease.Load())
	if h := heldAtRelease.Load(); h < int64(chainLen-2000) || h > fragmentBufferMaxHeld {
		t.Errorf("the server held %d bytes of the flight, want the chain (%d bytes) but its first fragment, within the bound %d",
			h, chainLen, fragmentBufferMaxHeld)
	}
	if n := droppedRecords.Load(); n != 0 {
		t.Fatalf("%d records of the handshake dropped", n)
	}

	if err := server.SetReadHandler(func(p []byte, err error) {
		if err == nil {
			if _, err := server.Write(p); err != nil {
				t.Errorf("echo: %v", err)
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	roundTrip := func(s string) {
		t.Helper()
		if _, err := client.Write([]byte(s)); err != nil {
			t.Fatalf("client write %q: %v", s, err)
		}
		// The server may send its last flight again for a handshake
		// record (patch (14)); the client reads only application data.
		_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := client.Read(buf)
		if err != nil || string(buf[:n]) != s {
			t.Fatalf("echo of %q: %q, %v", s, buf[:n], err)
		}
	}
	roundTrip("before")

	server.procMu.Lock()
	next := server.fragmentBuffer.currentMessageSequenceNumber
	server.procMu.Unlock()
	var flood [][]byte // record bodies, sealed when sent (the replay window)
	for i := range 100 {
		flood = append(flood, oneByteFragmentRecord(next+1+uint16(i))) //nolint:gosec // G115
	}
	for i := range 40 {
		flood = append(flood, bigFragment(next+101, i))
	}
	// In bursts, each followed by a round trip: the server handles a
	// peer's datagrams in order, so the echo comes after the burst, and
	// no burst outruns the sockets' buffers or the connection's queue
	// (patch (56)).
	const burst = 5
	for i := 0; i < len(flood); i += burst {
		for _, body := range flood[i:min(i+burst, len(flood))] {
			if _, err := pc.WriteTo(sealedRecord(t, client, protocol.ContentTypeHandshake, body), ln.Addr()); err != nil {
				t.Fatal(err)
			}
		}
		roundTrip(fmt.Sprintf("after %d", i))
		server.procMu.Lock()
		held, kept := server.fragmentBuffer.held(), fragmentBufferRetained(server.fragmentBuffer)
		server.procMu.Unlock()
		if held > fragmentBufferMaxHeld || kept > fragmentBufferMaxHeld {
			t.Fatalf("after %d records the server's fragment buffer holds %d bytes (as it counts them) and keeps %d reachable, want at most %d",
				i+burst, held, kept, fragmentBufferMaxHeld)
		}
	}
	if droppedRecords.Load() == 0 {
		t.Error("OnFragmentDropped was never called")
	} else if from, _ := droppedFrom.Load().(netip.AddrPort); from != netip.MustParseAddrPort(pc.LocalAddr().String()) {
		t.Errorf("OnFragmentDropped was told of %v, want the client's address %v", from, pc.LocalAddr())
	}
	server.procMu.Lock()
	t.Logf("%d of %d records dropped; %d fragments of %d messages, %d bytes held", droppedRecords.Load(), len(flood),
		server.fragmentBuffer.totalFragmentCount, len(server.fragmentBuffer.cache), server.fragmentBuffer.held())
	server.procMu.Unlock()
	if server.isConnectionClosed() {
		t.Error("the server's connection was closed")
	}
	roundTrip("at the end")
}

// TestBastionHandshakeCacheBound (patch (57)): during a handshake, whole
// messages that the peer sends one after the other (the fragment buffer
// hands each on as it comes) are kept by the handshake cache up to
// handshakeCacheMaxSize, 256 KiB, and handshakeCacheMaxCount, 128
// messages; the one past either is refused with pion's overflow error and
// a fatal alert, which ends the handshake (pion kept 8 MB, 1000 messages).
func TestBastionHandshakeCacheBound(t *testing.T) {
	for _, tc := range []struct {
		size int
		want int // the first message refused
	}{
		{7000, (256 << 10) / (7000 + handshake.HeaderLength)}, // the bytes bind
		{0, 128}, // the count binds
	} {
		t.Run(fmt.Sprintf("%d bytes", tc.size), func(t *testing.T) {
			conn := &Conn{
				handshakeCache:         newHandshakeCache(),
				fragmentBuffer:         newFragmentBuffer(),
				log:                    logging.NewDefaultLoggerFactory().NewLogger("dtls"),
				replayProtectionWindow: 64,
			}
			refused := -1
			for i := range 200 {
				rec := plaintextRecord(t, protocol.ContentTypeHandshake, uint64(i), //nolint:gosec // G115
					handshakeFragment(handshake.TypeCertificate, uint16(i), uint32(tc.size), 0, uint32(tc.size))) //nolint:gosec // G115
				_, _, fatal, err := conn.handleIncomingPacket(context.Background(), rec, nil, false)
				if conn.handshakeCache.size > 256<<10 {
					t.Fatalf("after message %d the handshake cache holds %d bytes, want at most 256 KiB", i, conn.handshakeCache.size)
				}
				if err != nil {
					if !errors.Is(err, errHandshakeCacheOverflow) || fatal == nil || fatal.Level != alert.Fatal {
						t.Fatalf("message %d: %v, alert %v; want %v and a fatal alert", i, err, fatal, errHandshakeCacheOverflow)
					}
					refused = i

					break
				}
			}
			if refused != tc.want {
				t.Fatalf("message %d refused (the cache holds %d bytes in %d messages), want message %d",
					refused, conn.handshakeCache.size, len(conn.handshakeCache.cache), tc.want)
			}
		})
	}
}

// sealedLookingRecord is a record of epoch 1 with sequence number seq and
// n bytes of body: what a peer sends once it has its keys, which a
// connection without them yet can only queue.
func sealedLookingRecord(t *testing.T, seq uint64, n int) []byte {
	t.Helper()
	h := recordlayer.Header{
		ContentType:    protocol.ContentTypeHandshake,
		Version:        protocol.Version1_2,
		Epoch:          1,
		SequenceNumber: seq,
		ContentLen:     uint16(n), //nolint:gosec // G115: test records are below 16 KiB.
	}
	b, err := h.Marshal()
	if err != nil {
		t.Fatal(err)
	}

	return append(b, make([]byte, n)...)
}

// TestBastionEarlyRecordQueueBound (patch (58)): records of the next
// epoch that come before the handshake has its keys wait for them up to
// 16 KiB in all: two of 8,000 bytes, then none (pion queued 100 of any
// size, 800 KB); records of a peer's own last flight, far smaller, are
// all queued, up to pion's count.
func TestBastionEarlyRecordQueueBound(t *testing.T) {
	for _, tc := range []struct {
		size, want int
	}{
		{8000, 2},
		{61, maxAppDataPacketQueueSize}, // a Finished with CCM-8
	} {
		t.Run(fmt.Sprintf("%d bytes", tc.size), func(t *testing.T) {
			conn := &Conn{
				handshakeCache:         newHandshakeCache(),
				fragmentBuffer:         newFragmentBuffer(),
				log:                    logging.NewDefaultLoggerFactory().NewLogger("dtls"),
				replayProtectionWindow: 64,
			}
			for i := range 200 {
				rec := sealedLookingRecord(t, uint64(i), tc.size) //nolint:gosec // G115
				if _, _, fatal, err := conn.handleIncomingPacket(context.Background(), rec, nil, true); err != nil || fatal != nil {
					t.Fatalf("record %d: %v, alert %v", i, err, fatal)
				}
			}
			queued := 0
			for _, p := range conn.encryptedPackets {
				queued += len(p.data)
			}
			if len(conn.encryptedPackets) != tc.want || queued > 16<<10 || queued != conn.encryptedBytes {
				t.Fatalf("%d records of %d bytes queued, %d bytes (counted: %d); want %d records, at most 16 KiB",
					len(conn.encryptedPackets), tc.size+recordlayer.FixedHeaderSize, queued, conn.encryptedBytes, tc.want)
			}
		})
	}
}

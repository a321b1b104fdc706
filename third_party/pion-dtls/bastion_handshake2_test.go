// SPDX-FileCopyrightText: 2026 Bastion authors
// SPDX-License-Identifier: MIT

package dtls

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"reflect"
	"testing"
	"time"

	"github.com/pion/dtls/v3/pkg/crypto/prf"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/extension"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
)

// The rules of a server's Finished (flight6Generate), the longest list.
func finishedRules() []handshakeCachePullRule {
	return []handshakeCachePullRule{
		{handshake.TypeClientHello, 0, true, false},
		{handshake.TypeServerHello, 0, false, false},
		{handshake.TypeCertificate, 0, false, false},
		{handshake.TypeServerKeyExchange, 0, false, false},
		{handshake.TypeCertificateRequest, 0, false, false},
		{handshake.TypeServerHelloDone, 0, false, false},
		{handshake.TypeCertificate, 0, true, false},
		{handshake.TypeClientKeyExchange, 0, true, false},
		{handshake.TypeCertificateVerify, 0, true, false},
		{handshake.TypeFinished, 1, true, false},
	}
}

// TestBastionTranscriptHash (patch (36)): transcriptHash is the hash of
// pullAndMerge's bytes for caches with messages missing, repeated
// (several ClientHellos, the last one counts) and on both sides, short
// (SHA-256 on the stack) and long (the heap); the verify data made from it
// is the verify data made from the merged transcript; sessionHash is what
// it was.
func TestBastionTranscriptHash(t *testing.T) {
	rnd := rand.New(rand.NewSource(1)) //nolint:gosec // test data
	types := []handshake.Type{
		handshake.TypeClientHello, handshake.TypeServerHello, handshake.TypeCertificate,
		handshake.TypeServerKeyExchange, handshake.TypeCertificateRequest, handshake.TypeServerHelloDone,
		handshake.TypeClientKeyExchange, handshake.TypeCertificateVerify, handshake.TypeFinished,
	}
	master := bytes.Repeat([]byte{7}, 48)
	for round := range 300 {
		h := newHandshakeCache()
		n := rnd.Intn(16)
		maxLen := []int{40, 200, 900}[round%3]
		for i := range n {
			data := make([]byte, rnd.Intn(maxLen))
			rnd.Read(data)
			typ := types[rnd.Intn(len(types))]
			epoch := uint16(rnd.Intn(2))                              //nolint:gosec
			_ = h.push(data, epoch, uint16(i), typ, rnd.Intn(2) == 0) //nolint:gosec
		}
		rules := finishedRules()
		merged := h.pullAndMerge(rules...)
		for _, hf := range []prf.HashFunc{sha256.New, sha512.New384} {
			want := hf()
			want.Write(merged)
			got, err := h.transcriptHash([]byte("prefix"), hf, rules...)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, append([]byte("prefix"), want.Sum(nil)...)) {
				t.Fatalf("round %d: transcriptHash %x, want the hash of %d merged bytes %x", round, got, len(merged), want.Sum(nil))
			}
			sum := got[len("prefix"):]
			for _, f := range []struct {
				name      string
				fromHash  func([]byte, []byte, prf.HashFunc) ([]byte, error)
				fromBytes func([]byte, []byte, prf.HashFunc) ([]byte, error)
			}{
				{"client", prf.VerifyDataClientHash, prf.VerifyDataClient},
				{"server", prf.VerifyDataServerHash, prf.VerifyDataServer},
			} {
				a, err1 := f.fromHash(master, sum, hf)
				b, err2 := f.fromBytes(master, merged, hf)
				if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
					t.Fatalf("round %d: %s verify data from the hash %x (%v), from the bytes %x (%v)", round, f.name, a, err1, b, err2)
				}
			}
			// sessionHash, as it was: pull, then the messages hashed in order.
			items := h.pull(rules[:8]...)
			wantSession := hf()
			for _, it := range items {
				if it != nil {
					wantSession.Write(it.data)
				}
			}
			gotSession, err := h.sessionHash(hf, 0)
			if err != nil || !bytes.Equal(gotSession, wantSession.Sum(nil)) {
				t.Fatalf("round %d: sessionHash %x (%v), want %x", round, gotSession, err, wantSession.Sum(nil))
			}
		}
	}
	// A PSK transcript with SHA-256 is hashed without allocating.
	h := newHandshakeCache()
	for i, typ := range []handshake.Type{handshake.TypeClientHello, handshake.TypeServerHello, handshake.TypeServerHelloDone, handshake.TypeClientKeyExchange} {
		_ = h.pushOwned(make([]byte, 100), 0, uint16(i), typ, typ == handshake.TypeClientHello || typ == handshake.TypeClientKeyExchange) //nolint:gosec
	}
	rules := finishedRules()
	var buf [64]byte
	if n := testing.AllocsPerRun(20, func() {
		if _, err := h.transcriptHash(buf[:0], sha256.New, rules...); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("transcriptHash of a PSK transcript: %v allocations, want 0", n)
	}
}

// TestBastionStateClone (patch (34)): clone makes what deserializing the
// serialized state made.
func TestBastionStateClone(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	for _, c := range []*Conn{client, server} {
		c.lock.RLock()
		got, err := c.state.clone()
		ser, err2 := c.state.serialize()
		c.lock.RUnlock()
		if err != nil || err2 != nil {
			t.Fatal(err, err2)
		}
		want := &State{}
		want.deserialize(*ser)
		// The cipher suites are new, uninitialised ones of the same kind.
		if reflect.TypeOf(got.cipherSuite) != reflect.TypeOf(want.cipherSuite) || got.cipherSuite.IsInitialized() {
			t.Fatalf("clone's cipher suite %T (initialised %v), want a new %T", got.cipherSuite, got.cipherSuite.IsInitialized(), want.cipherSuite)
		}
		got.cipherSuite, want.cipherSuite = nil, nil
		if got.remoteSequenceNumber.Load() != want.remoteSequenceNumber.Load() {
			t.Fatalf("remote sequence number %d, want %d", got.remoteSequenceNumber.Load(), want.remoteSequenceNumber.Load())
		}
		got.remoteSequenceNumber, want.remoteSequenceNumber = nil, nil
		if g, w := fmt.Sprintf("%+v", *got), fmt.Sprintf("%+v", *want); g != w { //nolint:govet // the atomics are read through %v
			t.Fatalf("clone:\n%s\nwant:\n%s", g, w)
		}
	}
	// An unfinished state fails as before.
	if _, err := (&State{}).clone(); err == nil {
		t.Fatal("clone of a state without a cipher suite succeeded")
	}
}

// TestBastionPeerIdentity (patch (37)): PeerIdentity answers what
// ConnectionState's State holds, on both ends.
func TestBastionPeerIdentity(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	for _, c := range []*Conn{client, server} {
		st, ok := c.ConnectionState()
		hint, certs, ok2 := c.PeerIdentity()
		if ok != ok2 || !bytes.Equal(hint, st.IdentityHint) || !reflect.DeepEqual(certs, st.PeerCertificates) {
			t.Fatalf("PeerIdentity %q %v %v, ConnectionState %q %v %v", hint, certs, ok2, st.IdentityHint, st.PeerCertificates, ok)
		}
	}
	if _, _, ok := server.PeerIdentity(); !ok {
		t.Fatal("no identity after the handshake")
	}
	if hint, _, _ := server.PeerIdentity(); !bytes.Equal(hint, []byte("device")) {
		t.Fatalf("server sees identity %q, want %q", hint, "device")
	}
	if _, _, ok := (&Conn{}).PeerIdentity(); ok {
		t.Fatal("PeerIdentity of a connection without a handshake: ok")
	}
}

// TestBastionClientHelloNegotiationHash (patch (40)): the hash written on
// the stack is the hash of what Marshal makes of the ClientHello without
// cookie and extensions, for hellos with and without session IDs, many
// or no cipher suites, several compression methods (Marshal writes them
// last first), cookies and extensions (left out); what does not fit or
// Marshal refuses takes Marshal's way.
func TestBastionClientHelloNegotiationHash(t *testing.T) {
	reference := func(hello *handshake.MessageClientHello) ([sha256.Size]byte, error) {
		normalized := *hello
		normalized.Cookie = nil
		normalized.Extensions = nil
		raw, err := normalized.Marshal()
		if err != nil {
			return [sha256.Size]byte{}, err
		}

		return sha256.Sum256(raw), nil
	}
	rnd := rand.New(rand.NewSource(2)) //nolint:gosec // test data
	for round := range 500 {
		hello := &handshake.MessageClientHello{
			Version:    protocol.Version{Major: byte(rnd.Intn(256)), Minor: byte(rnd.Intn(256))}, //nolint:gosec
			Cookie:     make([]byte, rnd.Intn(33)),
			SessionID:  make([]byte, []int{0, 1, 32, 255, 256}[rnd.Intn(5)]),
			Extensions: []extension.Extension{&extension.UseExtendedMasterSecret{Supported: true}},
		}
		hello.Random.GMTUnixTime = time.Unix(int64(rnd.Uint32()), 0)
		rnd.Read(hello.Random.RandomBytes[:])
		rnd.Read(hello.SessionID)
		rnd.Read(hello.Cookie)
		for range []int{0, 1, 4, 60, 600}[rnd.Intn(5)] {
			hello.CipherSuiteIDs = append(hello.CipherSuiteIDs, uint16(rnd.Intn(1<<16))) //nolint:gosec
		}
		for range rnd.Intn(4) {
			hello.CompressionMethods = append(hello.CompressionMethods, &protocol.CompressionMethod{ID: protocol.CompressionMethodID(rnd.Intn(256))}) //nolint:gosec
		}
		want, wantErr := reference(hello)
		got, err := clientHelloNegotiationHash(hello)
		if got != want || (err == nil) != (wantErr == nil) {
			t.Fatalf("round %d: hash %x (%v), want %x (%v)", round, got, err, want, wantErr)
		}
		_, stack := clientHelloNegotiationHashStack(hello)
		if fits := len(hello.SessionID) <= 255 && len(hello.CipherSuiteIDs) <= 400; stack != fits {
			t.Fatalf("round %d: on the stack %v for a session ID of %d and %d suites", round, stack, len(hello.SessionID), len(hello.CipherSuiteIDs))
		}
	}
	hello := &handshake.MessageClientHello{
		Version:            protocol.Version1_2,
		CipherSuiteIDs:     []uint16{0xc0a8, 0x00a8},
		CompressionMethods: []*protocol.CompressionMethod{{ID: 0}},
	}
	if n := testing.AllocsPerRun(20, func() { _, _ = clientHelloNegotiationHash(hello) }); n != 0 {
		t.Errorf("clientHelloNegotiationHash: %v allocations, want 0", n)
	}
}

// A connection makes its read and write deadlines only when something
// needs them (patch (47)): after a handshake, and with records going to a
// read handler, the server holds neither; a deadline set later works as
// before: a past read deadline ends Read, a past write deadline ends
// Write, clearing it lets writes through, and Close after a Write still
// closes.
func TestBastionLazyConnDeadlines(t *testing.T) {
	client, server := bastionPair(t, func([]byte, bool) bool { return true })
	if err := server.SetReadHandler(func([]byte, error) {}); err != nil {
		t.Fatal(err)
	}
	if server.readDeadline.Load() != nil || server.writeDeadline.Load() != nil {
		t.Fatal("the server's deadlines were made before anything set or needed them")
	}
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if client.writeDeadline.Load() == nil {
		t.Fatal("Write did not make the write deadline")
	}
	if client.readDeadline.Load() != nil {
		t.Fatal("Write made the read deadline")
	}
	if err := client.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if _, err := client.Read(make([]byte, 16)); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Read past its deadline: %v, want a timeout", err)
	}
	if err := server.SetWriteDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Write([]byte("x")); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("Write past its deadline: %v, want a timeout", err)
	}
	if err := server.SetWriteDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Write([]byte("x")); err != nil {
		t.Fatalf("Write after the deadline was cleared: %v", err)
	}
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Write([]byte("x")); !errors.Is(err, ErrConnClosed) {
		t.Fatalf("Write after Close: %v, want ErrConnClosed", err)
	}
}

package mqtt

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestOversizedConnectClosedBeforeItsBody: a connection whose first packet
// says it is larger than a CONNECT with the largest Will allowed is closed
// as soon as its fixed header is read, before the body, counted as
// connect_too_large. mochi allocated the whole body at the header, up to
// MaxPacketSize, before any credential was checked (here without a
// certificate, as secret logins may come). A CONNECT with a Will payload
// of MaxPayload bytes on a long topic still connects.
func TestOversizedConnectClosedBeforeItsBody(t *testing.T) {
	const maxPayload = 1024
	r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true, MaxPayload: maxPayload, MaxPacketSize: 1 << 20,
		HandshakeTimeout: time.Minute}, nil)
	if want := maxPayload + connectOverhead; r.s.connectLimit != want {
		t.Fatalf("connect limit %d, want %d", r.s.connectLimit, want)
	}
	d := r.dialTLS(t, "", 5, false)
	// Only the header: mochi would wait for the body until the CONNECT
	// deadline (a minute here).
	if _, err := d.c.Write(append([]byte{0x10}, encodeLength(r.s.connectLimit+1)...)); err != nil {
		t.Fatal(err)
	}
	d.closedWithin(10*time.Second, "a CONNECT header over the limit")
	if got := r.refusals(hub.ReasonConnectTooLarge); got != 1 {
		t.Errorf("connect_too_large refusals %v, want 1", got)
	}

	w := r.dialTLS(t, "deva", 5, true)
	topic := "devices/deva/t/" + strings.Repeat("x", hub.MaxPathLen)
	if pk := w.connectWill(packets.ConnectParams{WillTopic: topic, WillPayload: bytes.Repeat([]byte("w"), maxPayload), WillQos: 1}); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("CONNECT with a Will of %d bytes: packet type %d reason %#x, want CONNACK 0", maxPayload, pk.FixedHeader.Type, pk.ReasonCode)
	}
	if got := r.refusals(hub.ReasonConnectTooLarge); got != 1 {
		t.Errorf("connect_too_large refusals %v after a CONNECT within the limit, want 1", got)
	}
}

// encodeLength is MQTT's variable byte integer of n.
func encodeLength(n int) []byte {
	var b []byte
	for {
		c := byte(n & 0x7f)
		if n >>= 7; n > 0 {
			c |= 0x80
		}
		if b = append(b, c); n == 0 {
			return b
		}
	}
}

// headerCase is a line of testdata/fixed-headers.txt.
type headerCase struct {
	wire []byte
	want string // the remaining length, "malformed" or "eof"
}

func headerCases(t testing.TB) []headerCase {
	t.Helper()
	f, err := os.Open("testdata/fixed-headers.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []headerCase
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) != 2 {
			t.Fatalf("testdata/fixed-headers.txt: bad line %q", sc.Text())
		}
		var wire []byte
		if fields[0] != "-" {
			if wire, err = hex.DecodeString(fields[0]); err != nil {
				t.Fatalf("testdata/fixed-headers.txt: %q: %v", sc.Text(), err)
			}
		}
		out = append(out, headerCase{wire, fields[1]})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// readHeader runs readFixedHeader on wire and says what it made of it, as
// the table does, checking that it read the header's bytes and no more.
func readHeader(t *testing.T, wire []byte) string {
	t.Helper()
	r := bytes.NewReader(wire)
	var buf [maxFixedHeader]byte
	hdr, n, err := readFixedHeader(r, &buf)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.Is(err, errMalformedLength):
		return "malformed"
	case err != nil:
		t.Fatalf("%x: %v", wire, err)
	}
	if read := len(wire) - r.Len(); !bytes.Equal(hdr, wire[:read]) {
		t.Fatalf("%x: header %x, but read %x", wire, hdr, wire[:read])
	}
	return strconv.Itoa(n)
}

func TestReadFixedHeader(t *testing.T) {
	for _, c := range headerCases(t) {
		if got := readHeader(t, c.wire); got != c.want {
			t.Errorf("%x: %s, want %s", c.wire, got, c.want)
		}
	}
}

// FuzzReadFixedHeader: what readFixedHeader reads is a whole fixed header
// and nothing after it, and its remaining length is mochi's; a length it
// finds malformed mochi refuses too (mochi patch (16): mochi reads the
// fixed headers of a session's later packets).
func FuzzReadFixedHeader(f *testing.F) {
	for _, c := range headerCases(f) {
		f.Add(c.wire)
	}
	f.Fuzz(func(t *testing.T, wire []byte) {
		got := readHeader(t, wire)
		if got == "eof" {
			return
		}
		if got == "malformed" {
			if n, used, err := packets.DecodeLength(bytes.NewReader(wire[1:])); !errors.Is(err, packets.ErrMalformedVariableByteInteger) {
				t.Fatalf("%x: malformed; mochi's remaining length: %d in %d bytes, %v", wire, n, used, err)
			}
			return
		}
		n, used, err := packets.DecodeLength(bytes.NewReader(wire[1:]))
		if err != nil || strconv.Itoa(n) != got || used > 4 {
			t.Fatalf("%x: remaining length %s; mochi's: %d in %d bytes, %v", wire, got, n, used, err)
		}
	})
}

package coap_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
)

// Refused handshakes, which anyone on the network can cause, cannot flood
// the log: 1,000 PSK handshakes with random unknown 300-byte identities
// are each counted (unknown_psk_identity), but logged in a line or two
// (one per reason per 10 s, saying how many were not logged), each with
// the identity quoted and cut. Before, every one wrote a line holding the
// whole identity the peer chose (up to 64 KiB).
func TestRefusedHandshakesDoNotFloodTheLog(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{MaxHandshakesPerSource: 64}, slog.New(lines), 0)
	raddr, err := net.ResolveUDPAddr("udp", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	const n, parallel = 1000, 16
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	next := make(chan struct{}, n)
	for range n {
		next <- struct{}{}
	}
	close(next)
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := 0
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				ident := make([]byte, 150)
				rand.Read(ident)
				d := &devicesim.Device{Creds: devicesim.Creds{ID: "nobody", Auth: "psk", PSKIdentity: hex.EncodeToString(ident), PSK: "00112233445566778899aabbccddeeff"}}
				cfg, err := d.DTLSConfig(pskAddr)
				if err != nil {
					t.Error(err)
					return
				}
				hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
				c, err := piondtls.Dial("udp", raddr, cfg)
				if err == nil {
					if c.HandshakeContext(hctx) == nil {
						mu.Lock()
						accepted++
						mu.Unlock()
					}
					c.Close()
				}
				hcancel()
			}
		}()
	}
	wg.Wait()
	if accepted > 0 {
		t.Fatalf("%d handshakes with unknown identities accepted", accepted)
	}
	refused := testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonUnknownPSK))
	if refused != n {
		t.Errorf("unknown_psk_identity refusals %v, want %d: every refusal is counted", refused, n)
	}
	const line = "coap: handshake refused: PSK identity not accepted"
	got := lines.Count(line)
	if got < 1 || got > 10 {
		t.Errorf("%d log lines for %d refused handshakes, want 1 to 10 (one per 10 s)", got, n)
	}
	for _, a := range lines.Attrs(line) {
		if len(a["psk_identity"]) > 100 || len(a["err"]) > 300 {
			t.Errorf("log line with a %d-byte psk_identity and a %d-byte err, want them cut: %q", len(a["psk_identity"]), len(a["err"]), a["psk_identity"])
			break
		}
	}
}

// Refusals of what an authenticated device sends cannot flood the log
// either: a device sending 200 datagrams that do not decode gets an RST
// for each and each is counted (bad_request), in a line or two (one per
// device and kind per 10 s); another device's refusal meanwhile still gets
// its own line. Before, each wrote a line.
func TestDeviceRefusalsDoNotFloodTheLog(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, pskDev, certDev, pskAddr, certAddr, _ := startWith(t, id, nopSink{}, coap.Config{}, slog.New(lines), 0)
	bad := func() float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonBadRequest))
	}
	garbage := func(d *rawDevice, mid uint16) {
		t.Helper()
		// A CON header with token length 15 (RFC 7252 reserves 9-15).
		if _, err := d.dc.Write([]byte{0x4f, 0x02, byte(mid >> 8), byte(mid), 1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		if a := d.next(); a.typ != message.Reset || a.mid != mid {
			t.Fatalf("answer to a malformed CON: %v %d, want RST %d", a.typ, a.mid, mid)
		}
	}
	const n = 200
	d := dialRaw(t, pskDev, pskAddr)
	for i := range n {
		garbage(d, uint16(i+1))
	}
	other := dialRaw(t, certDev, certAddr)
	garbage(other, 1)
	deadline := time.Now().Add(5 * time.Second)
	for bad() != n+1 {
		if time.Now().After(deadline) {
			t.Fatalf("bad_request refusals %v, want %d: every refusal is counted", bad(), n+1)
		}
		time.Sleep(5 * time.Millisecond)
	}
	const line = "coap: request refused"
	byDevice := map[string]int{}
	for _, a := range lines.Attrs(line) {
		byDevice[a["device"]]++
	}
	if got := byDevice[pskDev.Creds.ID]; got < 1 || got > 2 {
		t.Errorf("%d log lines for %d refusals of %s, want 1 or 2 (one per 10 s)", got, n, pskDev.Creds.ID)
	}
	if got := byDevice[certDev.Creds.ID]; got != 1 {
		t.Errorf("%d log lines for the refusal of %s, want its own line: %v", got, certDev.Creds.ID, byDevice)
	}
}

// Refusals in enrollment sessions cannot flood the log either: anyone can
// open one while a pairing window is open (the PAKE's PSK is public)
// under an id of their choice, so their lines are one per kind per 10 s
// whatever the id, not one per kind and id. 12 PAKE sessions with
// distinct ids each send a request outside what the session may reach
// (4.03), a datagram that does not decode (RST), a request with a
// critical option the gateway does not process (4.02), one whose path is
// not UTF-8 (4.00) and a non-confirmable one too large to read (dropped):
// each refusal counted, one or two lines of each kind. Before, each
// session's refusals had a line of their own, keyed by its id.
func TestEnrollmentRefusalsDoNotFloodTheLog(t *testing.T) {
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, &windowIdentity{}, nopSink{}, coap.Config{Enroll: &windowEnroll{}}, slog.New(lines), 0)
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	refused := func(reason string) float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, reason))
	}
	const n = 12
	for i := range n {
		dc, err := pskFrom(ctx, t, "127.0.0.1", raddr, fmt.Sprintf("pake:%d-%s", i, strings.Repeat("x", 300)))
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		d := &rawDevice{t: t, dc: dc}
		write := func(m message.Message) {
			t.Helper()
			raw := make([]byte, 4096)
			k, err := coder.DefaultCoder.Encode(m, raw)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := dc.Write(raw[:k]); err != nil {
				t.Fatal(err)
			}
		}
		// Dropped unanswered; the session's datagrams are served in order,
		// so the answers below come after it was counted.
		write(message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 1, Token: message.Token{'n'},
			Options: message.Options{{ID: message.URIPath, Value: []byte("t")}}, Payload: bytes.Repeat([]byte("n"), 2000)})
		d.send(2, codes.GET, "/t/x", nil)
		d.expect("a request outside the session's kind", 2, codes.Forbidden)
		if _, err := dc.Write([]byte{0x4f, 0x02, 0x00, 0x03, 1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		if a := d.next(); a.typ != message.Reset || a.mid != 3 {
			t.Fatalf("answer to a malformed CON: %v %d, want RST 3", a.typ, a.mid)
		}
		write(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 4, Token: tokenOf(4),
			Options: message.Options{{ID: message.URIPath, Value: []byte("t")}, {ID: message.URIQuery, Value: []byte("a=b")}}})
		d.expect("a request with Uri-Query", 4, codes.BadOption)
		write(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 5, Token: tokenOf(5),
			Options: message.Options{{ID: message.URIPath, Value: []byte{0xff, 0xfe}}}})
		d.expect("a request whose path is not UTF-8", 5, codes.BadRequest)
		dc.Close()
	}
	if got := refused(hub.ReasonBadRequest); got != 4*n {
		t.Errorf("bad_request refusals %v, want %d: every refusal is counted", got, 4*n)
	}
	if got := refused(hub.ReasonTooLarge); got != n {
		t.Errorf("payload_too_large refusals %v, want %d", got, n)
	}
	for _, msg := range []string{
		"coap: request refused: outside what the session may reach",
		"coap: request refused: malformed CoAP message",
		"coap: request refused: unrecognised critical option",
		"coap: request refused: malformed",
		"coap: request dropped: datagram too large to read",
	} {
		var a []map[string]string
		for _, l := range lines.Attrs(msg) {
			// "malformed" is a prefix of "malformed CoAP message", whose
			// lines say what they answered.
			if _, ok := l["answer"]; !ok || msg != "coap: request refused: malformed" {
				a = append(a, l)
			}
		}
		// 1 unless the sessions above took longer than 10 s.
		if len(a) < 1 || len(a) > 2 {
			t.Errorf("%d lines %q for %d sessions with distinct ids, want 1 or 2 (one per kind per 10 s)", len(a), msg, n)
			continue
		}
		if len(a[0]["device"]) > 300 {
			t.Errorf("line %q names a %d-byte device, want the id cut", msg, len(a[0]["device"]))
		}
	}
}

// A device's observe registrations past its limit, and commands too large
// to notify it, cannot flood the log either: 200 of each are each counted
// (observe_limit, payload_too_large) in a line or two per kind (one per
// device and kind per 10 s), naming the device. Before, each wrote a line:
// a GET with Observe and a new token is one datagram, and the cloud sends
// commands at the rate it likes. (The topics are clipped too, though a
// path is at most hub.MaxPathLen, 256 bytes.)
//
// Mutation that fails it: either line in handler.go (session.observe,
// session.notify) back on s.log directly.
func TestObserveRefusalsDoNotFloodTheLog(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	lines := &coap.LogLines{}
	s, pskDev, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{}, slog.New(lines), 0)
	h := coap.HubOf(s)
	const n = 200
	path := "/c/x/" + strings.Repeat("s", 200)
	d := dialRaw(t, pskDev, pskAddr)
	for i := range 16 {
		d.sendObserve(uint16(1+i), path)
		if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq < 0 {
			t.Fatalf("registration %d: %v, want an ACK with Observe", i, a)
		}
	}
	for i := range n {
		d.sendObserve(uint16(100+i), path)
		if a := d.nextObserved(); a.typ != message.Acknowledgement || a.seq >= 0 {
			t.Fatalf("registration %d past the limit: %v, want an ACK without Observe", 17+i, a)
		}
	}
	big := bridges.Message{Device: pskDev.Creds.ID, Topic: "devices/" + pskDev.Creds.ID + path, Payload: []byte(strings.Repeat("b", 2000))}
	for range n {
		if err := h.Downlink(context.Background(), big); !errors.Is(err, bridges.ErrNoReceiver) {
			t.Fatalf("Downlink of a command too large to notify: %v, want ErrNoReceiver", err)
		}
	}
	for _, c := range []struct {
		reason, line string
		observers    int
	}{
		{hub.ReasonObserveLimit, "coap: observe not registered", 1},
		// Each of the 16 registrations is an observer the command is too
		// large for.
		{hub.ReasonTooLarge, "coap: command not notified", 16},
	} {
		if got := testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, c.reason)); got != float64(n*c.observers) {
			t.Errorf("%s refusals %v, want %d: every refusal is counted", c.reason, got, n*c.observers)
		}
		if got := lines.Count(c.line); got < 1 || got > 2 {
			t.Errorf("%d log lines %q for %d refusals, want 1 or 2 (one per 10 s)", got, c.line, n*c.observers)
		}
		for _, a := range lines.Attrs(c.line) {
			if a["device"] != pskDev.Creds.ID {
				t.Errorf("log line %q about device %q, want %s", c.line, a["device"], pskDev.Creds.ID)
				break
			}
		}
	}
}

package coap_test

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/pki"
)

// What a device sends that the gateway refuses before any handler runs is
// counted, with a reason a person can act on: a datagram that does not
// decode as CoAP (bad_request; it was logged at debug only), a
// non-confirmable request too large to read (payload_too_large; dropped
// without a trace), a Block1 block out of order (bad_request, 4.08).
func TestBadInputInASessionCounted(t *testing.T) {
	h, dev, addr := startObserveServerWith(t, coap.Config{}, nil)
	d := dialRaw(t, dev, addr)
	count := func(reason string) float64 {
		return testutil.ToFloat64(h.Metrics().Refused.WithLabelValues(hub.CoAP, reason))
	}
	wait := func(what, reason string, want float64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for count(reason) != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s: refusals{reason=%q} = %v, want %v", what, reason, count(reason), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// A CON header with token length 15 (RFC 7252 reserves 9-15): RST.
	if _, err := d.dc.Write([]byte{0x4f, 0x02, 0x00, 0x07, 1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if a := d.next(); a.typ != message.Reset || a.mid != 7 {
		t.Fatalf("answer to a malformed CON: %v %d, want RST 7", a.typ, a.mid)
	}
	wait("garbage in a session", hub.ReasonBadRequest, 1)

	// A NON POST of 2000 bytes, over the 1472 bytes a datagram may carry.
	m := message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 8, Token: message.Token{'n'}, Payload: bytes.Repeat([]byte("n"), 2000)}
	buf := make([]byte, 64)
	var err error
	if m.Options, _, err = m.Options.SetPath(buf, "/t/x"); err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, 2100)
	n, err := coder.DefaultCoder.Encode(m, raw)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.dc.Write(raw[:n]); err != nil {
		t.Fatal(err)
	}
	wait("a non-confirmable datagram too large to read", hub.ReasonTooLarge, 1)

	// Block 1 of a transfer that never had a block 0.
	d.sendPost(9, "/t/x", bytes.Repeat([]byte("b"), 1024), block1(t, 1, true))
	d.expect("Block1 block 1 first", 9, codes.RequestEntityIncomplete)
	wait("a Block1 block out of order", hub.ReasonBadRequest, 2)
}

// laterIdentity accepts every credential at the handshake and refuses it
// with err when the server checks it again after the handshake (a
// certificate's second lookup, in onNewConn).
type laterIdentity struct {
	fakeIdentity
	err error

	mu    sync.Mutex
	certs int
}

func (l *laterIdentity) VerifyCert([][]byte) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.certs++
	if l.certs > 1 {
		return "dev-cert", l.err
	}
	return "dev-cert", nil
}

// A session refused after its handshake is counted under why it was
// refused, not as revoked whatever the cause: the gateway's clock not set
// (clock_not_set), an enrollment outside a pairing window
// (pairing_refused), a store that failed to answer (identity_error), and a
// revocation (revoked).
func TestRefusalAfterHandshakeReason(t *testing.T) {
	for _, tc := range []struct {
		err    error
		reason string
	}{
		{fmt.Errorf("clock reads 1970-01-01: %w", pki.ErrClockNotSet), hub.ReasonClockNotSet},
		{fmt.Errorf("pairing session for %q refused: no window: %w", "x", bridges.ErrPairingRefused), hub.ReasonPairingRefused},
		{fmt.Errorf("device lookup: %w: %w", bridges.ErrLookup, errors.New("bolt: database not open")), hub.ReasonIdentityError},
		{fmt.Errorf("device dev-cert: %w", pki.ErrRevoked), hub.ReasonRevoked},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			id := &laterIdentity{fakeIdentity: fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}, err: tc.err}
			s, _, certDev, _, certAddr, _ := startWith(t, id, nopSink{}, coap.Config{}, nil, 0)
			if err := request(t, certDev, certAddr); err == nil {
				t.Fatal("request answered on a session refused after its handshake")
			}
			refusals := coap.HubOf(s).Metrics().Refused
			deadline := time.Now().Add(5 * time.Second)
			for testutil.ToFloat64(refusals.WithLabelValues(hub.CoAP, tc.reason)) != 1 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if n := testutil.ToFloat64(refusals.WithLabelValues(hub.CoAP, tc.reason)); n != 1 {
				t.Errorf("refusals{reason=%q} = %v, want 1", tc.reason, n)
			}
			// The device's request may reach the server after the refused
			// session is closed; it is then answered 4.01 and counted as
			// no_session, rightly. Any other series is a wrong count.
			series := testutil.CollectAndCount(refusals)
			if testutil.ToFloat64(refusals.WithLabelValues(hub.CoAP, hub.ReasonNoSession)) > 0 {
				series--
			}
			if series != 1 {
				t.Errorf("%d refusal series besides no_session, want only %q's", series, tc.reason)
			}
		})
	}
}

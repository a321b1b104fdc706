package gateway

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/pki/est"
)

// The PAKE session's PSK is public: anyone on the LAN can open one while
// a window is open and keep it. Its messages are refused in the window
// and after it, each counted, with at most one audit event and one log
// line per kind per interval; the session ends when the window closes.
// Before, every message after the close wrote a setup_code_missing and an
// attempt_refused event (fsynced each) and two log lines, which flushed
// the security record out of an audit log that keeps its newest 10,000.
func TestPAKESessionFromAnEarlierWindow(t *testing.T) {
	g := startPairing(t, nil)
	p := g.g.pairing
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const id = "acme-t1"
	msgRefused := func(reason string) int { return int(testutil.ToFloat64(p.msgRefused.WithLabelValues(reason))) }
	hello, _ := (pairing.PAKEMessage{Type: pairing.MsgHello, ID: []byte(id)}).MarshalBinary()

	g.press(t, 1500*time.Millisecond)
	s, err := devicesim.DialPSK(ctx, g.g.Addrs()["coaps_psk"], pairing.PAKEIdentityPrefix+id, pairing.PublicPAKEPSK(id))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// In the window: malformed messages on the session, each refused and
	// counted, logged by the bridge and the gateway a line or so each.
	const inWindow = 100
	for range inWindow {
		r, err := s.Do(ctx, codes.POST, coap.PAKEPath, []byte{0xff}, int(message.AppOctets))
		if err != nil || r.Code != codes.Forbidden {
			t.Fatalf("malformed PAKE message: %v %v, want 4.03", r.Code, err)
		}
	}
	if got := msgRefused("malformed"); got != inWindow {
		t.Errorf("messages_refused{malformed} = %d, want %d", got, inWindow)
	}
	waitFor(t, "the PAKE session registered", func() bool { return g.g.coap.Sessions(idPAKE+id) == 1 })

	// The window closes: the session ends with it.
	g.press(t, 11*time.Second)
	select {
	case <-s.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the PAKE session outlived its window")
	}
	if n := g.g.coap.Sessions(idPAKE + id); n != 0 {
		t.Errorf("%d PAKE sessions left after the window closed", n)
	}
	if got := testutil.ToFloat64(g.g.hub.Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonPairingClosed)); got != 1 {
		t.Errorf("refused{coap, %s} = %v, want 1", hub.ReasonPairingClosed, got)
	}

	// What such a session would send after the close (a handshake stalled
	// past it, or one kept alive), straight at the service: hellos,
	// enrollment requests, and attempts that find the window closed.
	audited := func() map[string]int {
		m := map[string]int{}
		for _, a := range []string{"pairing.message_refused", string(pairing.StepAttemptRefused), "pairing.setup_code_missing"} {
			m[a] = len(g.audited(t, a))
		}
		return m
	}
	before := audited()
	const n = 1000
	for range n {
		if _, err := p.PAKE(ctx, idPAKE+id, hello); err == nil {
			t.Fatal("hello accepted after the window closed")
		}
		if r := p.EST(ctx, idEnroll+id, coap.KindEnroll, nil, est.Request{Method: "POST", Path: est.PathSen}); r.Issued != nil || r.Err == nil {
			t.Fatalf("/sen after the window closed: %v, want refused", r.Err)
		}
		if _, err := p.EnrollPSK(ctx, idEnroll+id); err == nil {
			t.Fatal("PSK enrollment accepted after the window closed")
		}
		if _, err := p.win.Begin(idIDevID + "acme:00"); !errors.Is(err, pairing.ErrClosed) {
			t.Fatalf("attempt after the window closed: %v, want ErrClosed", err)
		}
	}
	if _, err := p.PAKE(ctx, idPAKE+id, hello); !errors.Is(err, errNoWindow) {
		t.Errorf("hello after the window closed: %v, want %v", err, errNoWindow)
	}
	if got := msgRefused("no window"); got != 3*n+1 {
		t.Errorf("messages_refused{no window} = %d, want %d (each counted)", got, 3*n+1)
	}
	after := audited()
	for a, max := range map[string]int{"pairing.message_refused": 1, string(pairing.StepAttemptRefused): 1, "pairing.setup_code_missing": 0} {
		if d := after[a] - before[a]; d > max {
			t.Errorf("%d %s events audited for %d refusals, want at most %d", d, a, n, max)
		}
	}
	logged := g.log.String()
	for line, max := range map[string]int{
		`msg="coap: pairing exchange refused"`:      1,
		`msg="pairing: PAKE message refused"`:       2, // malformed, no window
		`msg="pairing: enrollment request refused"`: 1,
		`msg="pairing: enrollment attempt refused"`: 1,
		`msg=pairing.attempt_refused`:               0, // the window's own line
	} {
		if got := strings.Count(logged, line); got > max {
			t.Errorf("%d log lines %s, want at most %d", got, line, max)
		}
	}

	// In a window, hellos for a device with no setup code: the window
	// closes after its failures, and the missing code is audited once
	// at once and once with the count as the window closes.
	g.press(t, 1500*time.Millisecond)
	before = audited()
	for range 50 {
		p.PAKE(ctx, idPAKE+id, hello)
	}
	if p.win.IsOpen() {
		t.Fatal("failed hellos did not close the window")
	}
	if d := audited()["pairing.setup_code_missing"] - before["pairing.setup_code_missing"]; d < 1 || d > 2 {
		t.Errorf("%d setup_code_missing events for 50 hellos, want 1 or 2", d)
	}
}

package coap_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/pki/est"
)

// windowKey is the PSK of every identity windowIdentity admits.
var windowKey = []byte("0123456789abcdef")

// windowIdentity admits every PSK identity as the device of that name,
// an enrollment identity (it holds a ':') only while the pairing window
// is open, as the gateway's pairing service does. after, if set, runs
// after each lookup of an enrollment identity (n counts them per
// identity), before the lookup returns.
type windowIdentity struct {
	mu      sync.Mutex
	closed  bool
	lookups map[string]int
	after   func(identity string, n int)
}

func (w *windowIdentity) PSK(identity []byte) (string, []byte, error) {
	dev := string(identity)
	if !strings.Contains(dev, ":") {
		return dev, windowKey, nil
	}
	w.mu.Lock()
	if w.lookups == nil {
		w.lookups = map[string]int{}
	}
	w.lookups[dev]++
	n, closed, after := w.lookups[dev], w.closed, w.after
	w.mu.Unlock()
	var err error
	if closed {
		err = fmt.Errorf("enrollment identity %s: no pairing window open: %w", dev, bridges.ErrPairingRefused)
	}
	if after != nil {
		after(dev, n)
	}
	if err != nil {
		return dev, nil, err
	}
	return dev, windowKey, nil
}

func (w *windowIdentity) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}

func (w *windowIdentity) lookupsOf(identity string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lookups[identity]
}

func (w *windowIdentity) VerifyCert([][]byte) (string, error) {
	return "", errors.New("no certificates")
}
func (w *windowIdentity) CheckSecret(string, []byte) error { return errors.New("no secrets") }
func (w *windowIdentity) OnRevoke(func(string))            {}
func (w *windowIdentity) CertValid(string, string, time.Time) error {
	return nil
}

// windowEnroll classifies "pake:..." as KindPAKE, "enroll:..." as
// KindEnroll and anything else as KindDevice, and keeps the function the
// server subscribed to the window's end (coap.EnrollmentEnd).
type windowEnroll struct {
	mu  sync.Mutex
	end func(kept string)
}

func (e *windowEnroll) Kind(device string) coap.Kind {
	switch {
	case strings.HasPrefix(device, "pake:"):
		return coap.KindPAKE
	case strings.HasPrefix(device, "enroll:"):
		return coap.KindEnroll
	}
	return coap.KindDevice
}

func (e *windowEnroll) PAKE(context.Context, string, []byte) ([]byte, error) {
	return nil, errors.New("no exchange in this test")
}

func (e *windowEnroll) EST(context.Context, string, coap.Kind, []*x509.Certificate, est.Request) est.Response {
	return est.Response{Code: est.Forbidden, Err: errors.New("no EST in this test")}
}

func (e *windowEnroll) EnrollPSK(context.Context, string) ([]byte, error) {
	return nil, errors.New("no PSK enrollment in this test")
}

func (e *windowEnroll) OnEnrollmentEnd(f func(kept string)) {
	e.mu.Lock()
	e.end = f
	e.mu.Unlock()
}

// closeWindow tells the server the window closed, keeping kept's
// sessions; false if the server did not subscribe.
func (e *windowEnroll) closeWindow(kept string) bool {
	e.mu.Lock()
	end := e.end
	e.mu.Unlock()
	if end == nil {
		return false
	}
	end(kept)
	return true
}

// endedAfterGrace fails unless c's session, of id, ends within 10 s (its
// grace after the window's close is 2 s).
func endedAfterGrace(t *testing.T, c *devicesim.CoAP, id string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("the session of %s outlived the window's close and its grace", id)
	}
}

// ended reports whether c's session has ended.
func ended(c *devicesim.CoAP) bool {
	select {
	case <-c.Done():
		return true
	default:
		return false
	}
}

// When the pairing window closes (coap.EnrollmentEnd), every enrollment
// session (KindPAKE, KindEnroll) is taken out of the device's sessions at
// once (and out of the count of enrollment sessions), counted
// pairing_window_closed, logged once, and closed after its grace; the
// kept identity's (the device that just enrolled) and the operational
// sessions stay open. The next close ends the one kept before, unless
// kept again.
func TestEnrollmentEndClosesEnrollmentSessions(t *testing.T) {
	enroll := &windowEnroll{}
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, &windowIdentity{}, nopSink{}, coap.Config{Enroll: enroll}, slog.New(lines), 0)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	open := map[string]*devicesim.CoAP{}
	for _, id := range []string{"pake:a", "enroll:b", "enroll:kept", "dev-1"} {
		c, err := devicesim.DialPSK(ctx, pskAddr, id, windowKey)
		if err != nil {
			t.Fatalf("session of %s: %v", id, err)
		}
		t.Cleanup(func() { c.Close() })
		open[id] = c
		waitSessions(t, s, id, 1)
	}
	closed := func() float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonPairingClosed))
	}

	if !enroll.closeWindow("enroll:kept") {
		t.Fatal("the server did not subscribe to the end of enrollment")
	}
	// Out of the device's sessions at once, though closed after a grace.
	for id, want := range map[string]int{"pake:a": 0, "enroll:b": 0, "enroll:kept": 1, "dev-1": 1} {
		if got := s.Sessions(id); got != want {
			t.Errorf("after the window closed: %d sessions of %s, want %d", got, id, want)
		}
	}
	if got := closed(); got != 2 {
		t.Errorf("refused{coap, %s} = %v, want 2", hub.ReasonPairingClosed, got)
	}
	// Nor counted against the bound of enrollment sessions any longer.
	if got := coap.EnrollSessions(s); got != 1 {
		t.Errorf("%d enrollment sessions counted after the window closed, want 1 (enroll:kept's)", got)
	}
	if a := lines.Attrs("coap: enrollment sessions closed with the pairing window"); len(a) != 1 || a[0]["sessions"] != "2" || a[0]["reason"] != hub.ReasonPairingClosed {
		t.Errorf("window-close lines %v, want one with sessions=2 reason=%s", a, hub.ReasonPairingClosed)
	}
	for _, id := range []string{"pake:a", "enroll:b"} {
		endedAfterGrace(t, open[id], id)
	}
	for _, id := range []string{"enroll:kept", "dev-1"} {
		if ended(open[id]) {
			t.Errorf("the session of %s ended with the window", id)
		}
	}

	// The next close keeps none: the enrolled device's enrollment
	// session ends too, the operational one stays.
	enroll.closeWindow("")
	if got := closed(); got != 3 {
		t.Errorf("refused{coap, %s} = %v after the second close, want 3", hub.ReasonPairingClosed, got)
	}
	endedAfterGrace(t, open["enroll:kept"], "enroll:kept")
	if got := coap.EnrollSessions(s); got != 0 {
		t.Errorf("%d enrollment sessions counted after the second close, want 0", got)
	}
	if got := s.Sessions("dev-1"); got != 1 {
		t.Errorf("%d sessions of dev-1 after two window closes, want 1", got)
	}
}

// A session whose credentials were checked before the window closed, and
// that is registered after, is checked again and refused: the window's
// close makes onNewConn look its credentials up again. The window closes
// right after onNewConn's own lookup of enroll:late found it good (the
// identity's hook), before the session is registered.
func TestEnrollmentEndChecksAgainASessionBeingSetUp(t *testing.T) {
	enroll := &windowEnroll{}
	id := &windowIdentity{}
	id.after = func(identity string, n int) {
		// 1: the handshake's PSK callback; 2: onNewConn's check.
		if identity == "enroll:late" && n == 2 {
			id.close()
			enroll.closeWindow("")
		}
	}
	s, _, _, pskAddr, _, _ := startWith(t, id, nopSink{}, coap.Config{Enroll: enroll}, nil, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := devicesim.DialPSK(ctx, pskAddr, "enroll:late", windowKey)
	switch {
	case err != nil && strings.Contains(err.Error(), "CloseNotify"):
		// Refused and closed (after it was counted) right after the
		// server's last flight, before the client had read it: the
		// session ended.
	case err != nil:
		t.Fatal(err)
	default:
		t.Cleanup(func() { c.Close() })
		// Either the session ends (refused after its handshake) or it
		// is registered.
		for deadline := time.Now().Add(10 * time.Second); s.Sessions("enroll:late") == 0 && !ended(c); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the session neither ended nor was registered")
			}
		}
	}
	if got := s.Sessions("enroll:late"); got != 0 {
		t.Fatalf("%d sessions of enroll:late registered after the window closed during its check", got)
	}
	if n := id.lookupsOf("enroll:late"); n != 3 {
		t.Errorf("enroll:late looked up %d times, want 3 (handshake, onNewConn, again after the window closed)", n)
	}
	if got := testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonPairingRefused)); got != 1 {
		t.Errorf("refused{coap, %s} = %v, want 1", hub.ReasonPairingRefused, got)
	}
}

// waitSessions waits up to 10 s for device to have want sessions.
func waitSessions(t *testing.T, s *coap.Server, device string, want int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); s.Sessions(device) != want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions of %s, want %d", s.Sessions(device), device, want)
		}
	}
}

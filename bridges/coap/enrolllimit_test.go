package coap_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/pki"
)

// pskFrom does a PSK handshake as identity, with windowKey, from the
// loopback address from to raddr; the connection is closed when the test
// ends.
func pskFrom(ctx context.Context, t *testing.T, from string, raddr *net.UDPAddr, identity string) (*piondtls.Conn, error) {
	pc, err := net.ListenPacket("udp4", from+":0")
	if err != nil {
		return nil, err
	}
	cfg := &piondtls.Config{
		ExtendedMasterSecret:  piondtls.RequireExtendedMasterSecret,
		ConnectionIDGenerator: piondtls.OnlySendCIDGenerator(),
		PSK:                   func([]byte) ([]byte, error) { return windowKey, nil },
		PSKIdentityHint:       []byte(identity),
		CipherSuites:          pki.DTLSPSKSuites,
	}
	c, err := piondtls.Client(pc, raddr, cfg)
	if err != nil {
		pc.Close()
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, c.HandshakeContext(ctx)
}

// settled waits up to 10 s for s to count want sessions open in all
// (every session closed has run its OnClose), and for the count to stay.
func settled(t *testing.T, s *coap.Server, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for stable := 0; stable < 20; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions open, want %d", s.SessionCount(), want)
		}
		if s.SessionCount() == want {
			stable++
		} else {
			stable = 0
		}
	}
}

// While a pairing window is open anyone on the LAN can complete a PAKE
// handshake (its PSK is public) under any id. The enrollment sessions are
// bounded in all (8) and per source (4), not only per id: past a bound
// the oldest is closed (counted session_taken_over, logged once per bound
// per interval), a source at its bound closing its own oldest, so one
// host cannot close another's. Before, every id held its own sessions
// until the window closed or they idled out (10 min).
//
// Six sessions with distinct ids from each of 127.0.0.2, .3 and .4, one
// after the other: .2's fifth and sixth close its first two, as .3's
// close its own; .4's first four close .2's remaining four (the oldest of
// all), its fifth and sixth its own first two. Then 48 more at once from
// six addresses: 8 stay open.
func TestEnrollmentSessionsBounded(t *testing.T) {
	lines := &coap.LogLines{}
	s, _, _, pskAddr, _, _ := startWith(t, &windowIdentity{}, nopSink{}, coap.Config{Enroll: &windowEnroll{}}, slog.New(lines), 0)
	raddr, err := net.ResolveUDPAddr("udp4", pskAddr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	takenOver := func() float64 {
		return testutil.ToFloat64(coap.HubOf(s).Metrics().Refused.WithLabelValues(hub.CoAP, hub.ReasonSessionTakenOver))
	}
	id := func(src, i int) string { return fmt.Sprintf("pake:%d-%d", src, i) }
	for src := 2; src <= 4; src++ {
		for i := 1; i <= 6; i++ {
			if _, err := pskFrom(ctx, t, fmt.Sprintf("127.0.0.%d", src), raddr, id(src, i)); err != nil {
				t.Fatalf("session of %s: %v", id(src, i), err)
			}
			// Registered, and whatever it closed taken out, at once.
			waitSessions(t, s, id(src, i), 1)
		}
	}
	open := map[string]bool{}
	for _, src := range []int{3, 4} {
		for i := 3; i <= 6; i++ {
			open[id(src, i)] = true
		}
	}
	for src := 2; src <= 4; src++ {
		for i := 1; i <= 6; i++ {
			want := 0
			if open[id(src, i)] {
				want = 1
			}
			if got := s.Sessions(id(src, i)); got != want {
				t.Errorf("%d sessions of %s, want %d", got, id(src, i), want)
			}
		}
	}
	settled(t, s, 8)
	if got := takenOver(); got != 10 {
		t.Errorf("refused{coap, %s} = %v, want 10 (18 sessions, 8 kept)", hub.ReasonSessionTakenOver, got)
	}
	for _, msg := range []string{
		"coap: oldest enrollment session of this source closed",
		"coap: oldest enrollment session closed to make room",
	} {
		// 1 unless the sessions above took longer than 10 s.
		if got := lines.Count(msg); got < 1 || got > 2 {
			t.Errorf("%d lines %q, want 1 or 2 (one per bound per 10 s)", got, msg)
		}
	}

	const sources, each = 6, 8
	var wg sync.WaitGroup
	for src := 10; src < 10+sources; src++ {
		for i := range each {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// A handshake may fail when a later session closes its
				// session as it completes; what matters is what stays.
				pskFrom(ctx, t, fmt.Sprintf("127.0.0.%d", src), raddr, id(src, i))
			}()
		}
	}
	wg.Wait()
	settled(t, s, 8)
	if got := coap.EnrollSessions(s); got != 8 {
		t.Errorf("%d enrollment sessions counted, want 8 (those open)", got)
	}
}

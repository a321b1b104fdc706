package coap

import (
	"bytes"
	"context"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
)

type discardSink struct{}

func (discardSink) Accept(context.Context, bridges.Message) error { return nil }

// A datagram a listener's socket had no room for (pion-dtls patch (52))
// is counted every time and logged at most once per refusalLogEvery, with
// how many were not logged: a peer that keeps the socket full cannot
// flood the log.
func TestWriteDroppedCountedAndLogged(t *testing.T) {
	lines := &LogLines{}
	h, err := hub.New(discardSink{}, prometheus.NewRegistry(), slog.New(lines))
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{m: h.Metrics(), log: slog.New(lines), lines: ratelog.New(refusalLogEvery)}
	s.dropped = s.m.Dropped.WithLabelValues(hub.CoAP)
	to := netip.MustParseAddrPort("192.0.2.7:5684")
	for range 1000 {
		s.writeDropped(to, 48)
	}
	if n := testutil.ToFloat64(s.m.Dropped.WithLabelValues(hub.CoAP)); n != 1000 {
		t.Errorf("bastion_transport_datagrams_dropped_total{transport=coap} = %v, want 1000", n)
	}
	const line = "coap: datagram not sent"
	if n := lines.Count(line); n != 1 {
		t.Errorf("%d log lines for 1000 dropped datagrams within %v, want 1", n, refusalLogEvery)
	}
	// The next interval's first drop is logged, with the count of those
	// that were not (the 999 after the first).
	if n, ok := s.lines.Allow("write_dropped", time.Now().Add(refusalLogEvery)); !ok || n != 999 {
		t.Errorf("a whole interval later: let through %v, %d not logged before; want true, 999", ok, n)
	}
}

func TestLoggedIdentity(t *testing.T) {
	long := bytes.Repeat([]byte{'x'}, 1000)
	long[0] = '\n'
	for in, want := range map[string]string{
		"id-psk":     "id-psk",
		"a\nb\x00":   "a\nb\x00",
		string(long): "\n" + string(long[1:maxLoggedIdentity]) + "… (1000 bytes)",
	} {
		if got := loggedIdentity([]byte(in)); got != want {
			t.Errorf("loggedIdentity(%q) = %q, want %q", in, got, want)
		}
	}
	// What a handler writes of one is quoted: no line break, no raw control
	// byte reaches the log.
	var out bytes.Buffer
	slog.New(slog.NewTextHandler(&out, nil)).Warn("x", "psk_identity", loggedIdentity(long))
	if strings.Count(out.String(), "\n") != 1 || len(out.String()) > 200 {
		t.Errorf("a logged identity wrote %q", out.String())
	}
}

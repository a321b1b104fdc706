package gateway

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/pairing"
	"github.com/bastion-iot/bastion/gateway/store"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/ratelog"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// refusalEvents is the audit log's refusals (sessions and PAKE messages),
// oldest first.
func (g *pgw) refusalEvents(t *testing.T) []store.Event {
	t.Helper()
	es, err := g.g.Store().AuditLog(10000, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []store.Event
	for i := len(es) - 1; i >= 0; i-- {
		if e := es[i]; e.Action == "pairing.session_refused" || e.Action == "pairing.message_refused" {
			out = append(out, e)
		}
	}
	return out
}

// refusalSummary is what a test compares of a refusal event: its action,
// target and the detail up to the time it may quote.
func refusalSummary(es []store.Event) []string {
	var out []string
	for _, e := range es {
		d, _, _ := strings.Cut(e.Detail, " since ")
		out = append(out, e.Action+" "+e.Target+" | "+d)
	}
	return out
}

// Enrollment handshakes and PAKE messages that the gateway refuses come
// from anyone on the LAN, unauthenticated, at the rate they can send:
// every one is counted in the metric, but the audit log (an fsynced store
// transaction each) gets the first of each reason at once and then at most
// one per reason per minute carrying how many were not audited since; the
// window opening or closing writes the counts held, and starts the
// reasons afresh, so a window's first refusal of each reason is audited at
// once. A device id the peer claims is cut.
func TestPairingRefusalsAudited(t *testing.T) {
	acmeRoot, _ := vendorCA(t, "acme")
	_, rogueDev := vendorCA(t, "rogue")
	rootFile := filepath.Join(t.TempDir(), "acme.pem")
	if err := os.WriteFile(rootFile, acmeRoot, 0o644); err != nil {
		t.Fatal(err)
	}
	g := startPairing(t, func(c *config.Config) { c.Pairing.Vendors = map[string]string{"acme": rootFile} })
	p := g.g.pairing
	clk := g.g.clock.(*testpki.OffsetClock)
	refused := func(reason string) int { return int(testutil.ToFloat64(p.refused.WithLabelValues(reason))) }
	const n = 1000
	long := strings.Repeat("x", 5000) // a claimed device id as long as a packet allows
	enroll := func(prefix, id string) error {
		_, _, err, ok := p.psk([]byte(prefix + id))
		if !ok {
			t.Fatalf("identity %.40q not taken as an enrollment identity", prefix+id)
		}
		return err
	}

	// No window: handshakes of a PAKE identity over DTLS, then many more
	// straight through the PSK callback they reach, and as many with an
	// identity too long to be a device id.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const dialed = 8
	for range dialed {
		s, err := devicesim.DialPSK(ctx, g.g.Addrs()["coaps_psk"], pairing.PAKEIdentityPrefix+"acme-t1", pairing.PublicPAKEPSK("acme-t1"))
		if err == nil {
			s.Close()
			t.Fatal("PAKE session accepted with no window open")
		}
	}
	if got := refused("no window"); got < dialed {
		t.Fatalf("refused{no window} = %d after %d refused handshakes", got, dialed)
	}
	base := refused("no window")
	for range n {
		if err := enroll(pairing.PAKEIdentityPrefix, "acme-t1"); !errors.Is(err, bridges.ErrPairingRefused) {
			t.Fatalf("no window: %v, want a pairing refusal", err)
		}
		err := enroll(pairing.PSKIdentityPrefix, long)
		if !errors.Is(err, bridges.ErrPairingRefused) {
			t.Fatalf("long id: %v, want a pairing refusal", err)
		}
		if len(err.Error()) > 2*maxPairingClaim+100 {
			t.Fatalf("the refusal quotes the whole claimed id: %d bytes", len(err.Error()))
		}
	}
	if got := refused("no window") - base; got != n {
		t.Errorf("refused{no window} grew by %d, want %d (each refusal counted)", got, n)
	}
	if got := refused("bad identity"); got != n {
		t.Errorf("refused{bad identity} = %d, want %d", got, n)
	}
	clipped := long[:maxPairingClaim] + "… (5000 bytes)"
	want := []string{
		"pairing.session_refused acme-t1 | no window: no pairing window is open: press the gateway's button first",
		"pairing.session_refused " + clipped + " | bad identity: enrollment identity without a usable device id",
	}
	if diff := cmp.Diff(want, refusalSummary(g.refusalEvents(t))); diff != "" {
		t.Fatalf("refusals audited with no window (-want +got):\n%s", diff)
	}

	// A minute on, the next refusal of a reason is audited with the count
	// of those that were not.
	clk.Add(pairingRefusalAuditEvery + time.Second)
	enroll(pairing.PAKEIdentityPrefix, "acme-t2")
	want = append(want, "pairing.session_refused acme-t2 | no window: no pairing window is open: press the gateway's button first; "+
		itoa(base+n-1)+" more refused")
	if diff := cmp.Diff(want, refusalSummary(g.refusalEvents(t))); diff != "" {
		t.Fatalf("refusals audited a minute on (-want +got):\n%s", diff)
	}

	// The window opens: the count held is written (the bad identities),
	// and in the window each reason's first refusal is audited at once: a
	// device that fails to pair shows up while the operator watches.
	g.press(t, 1500*time.Millisecond)
	want = append(want, "pairing.session_refused  | bad identity: "+itoa(n-1)+" more refused")
	for range n {
		if err := enroll(pairing.PSKIdentityPrefix, "acme-t3"); !errors.Is(err, bridges.ErrPairingRefused) {
			t.Fatalf("no exchange: %v, want a pairing refusal", err)
		}
		if _, err := p.verifyIDevID(rogueDev.Certificate, errors.New("not ours")); err == nil {
			t.Fatal("unknown vendor's certificate accepted")
		}
		if _, err := p.PAKE(ctx, idPAKE+"acme-t3", []byte{0xff}); err == nil {
			t.Fatal("malformed PAKE message accepted")
		}
	}
	for reason, want := range map[string]int{"no exchange": n, "unknown vendor": n} {
		if got := refused(reason); got != want {
			t.Errorf("refused{%s} = %d, want %d", reason, got, want)
		}
	}
	if !p.win.IsOpen() {
		t.Fatal("the refusals closed the window")
	}
	want = append(want,
		"pairing.session_refused acme-t3 | no exchange: no setup-code exchange completed for this device in the open window",
		"pairing.session_refused sensor-x1 | unknown vendor: certificate chains neither to this gateway's CA nor to a configured vendor root (pairing.vendors)",
		"pairing.message_refused acme-t3 | malformed: malformed enrollment message: unknown version or type",
	)
	if diff := cmp.Diff(want, refusalSummary(g.refusalEvents(t))); diff != "" {
		t.Fatalf("refusals audited in the window (-want +got):\n%s", diff)
	}

	// The window closes: the counts it held are written.
	g.press(t, 11*time.Second)
	if p.win.IsOpen() {
		t.Fatal("a long press did not close the window")
	}
	got := refusalSummary(g.refusalEvents(t))
	if len(got) != len(want)+3 {
		t.Fatalf("refusals audited after the window closed (want the first %d and 3 counts):\n%s", len(want), strings.Join(got, "\n"))
	}
	if diff := cmp.Diff(want, got[:len(want)]); diff != "" {
		t.Errorf("refusals audited before the window closed (-want +got):\n%s", diff)
	}
	wantHeld := map[string]bool{
		"pairing.session_refused  | no exchange: " + itoa(n-1) + " more refused":    true,
		"pairing.session_refused  | unknown vendor: " + itoa(n-1) + " more refused": true,
		"pairing.message_refused  | malformed: " + itoa(n-1) + " more refused":      true,
	}
	for _, s := range got[len(want):] {
		if !wantHeld[s] {
			t.Errorf("count written as the window closed: %q, want one of %v", s, wantHeld)
		}
		delete(wantHeld, s)
	}
}

// The pairing refusals' audit spacing (ratelog.Every, kinds action and
// reason) lets the first refusal of a kind through, then the first after
// the interval, with the count held since; a clock set back lets one
// through and spaces the next from it; Reset hands over the counts held
// and starts every kind afresh.
func TestRefusalAuditSpacing(t *testing.T) {
	r := ratelog.New(time.Minute)
	t0 := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	type note struct {
		n     int
		since time.Time
		ok    bool
	}
	try := func(reason string, at time.Time) note {
		n, since, ok := r.Note("pairing.session_refused\x00"+reason, at)
		return note{n, since, ok}
	}
	steps := []struct {
		reason string
		at     time.Time
		want   note
	}{
		{"no window", t0, note{0, time.Time{}, true}},
		{"no window", t0.Add(30 * time.Second), note{}},
		{"bad identity", t0.Add(30 * time.Second), note{0, time.Time{}, true}}, // kinds apart
		{"no window", t0.Add(59 * time.Second), note{}},
		{"no window", t0.Add(time.Minute), note{2, t0, true}},
		{"no window", t0.Add(time.Minute + time.Second), note{}},
		{"no window", t0.Add(-time.Hour), note{1, t0.Add(time.Minute), true}}, // clock set back
		{"no window", t0.Add(-time.Hour + time.Second), note{}},
		{"bad identity", t0.Add(40 * time.Second), note{}},
	}
	for i, s := range steps {
		if got := try(s.reason, s.at); got != s.want {
			t.Errorf("step %d (%s at %v): got %+v, want %+v", i, s.reason, s.at, got, s.want)
		}
	}
	held := map[string]ratelog.Held{}
	for _, h := range r.Reset() {
		held[h.Kind] = h
	}
	want := map[string]ratelog.Held{
		"pairing.session_refused\x00no window":    {Kind: "pairing.session_refused\x00no window", N: 1, Since: t0.Add(-time.Hour)},
		"pairing.session_refused\x00bad identity": {Kind: "pairing.session_refused\x00bad identity", N: 1, Since: t0.Add(30 * time.Second)},
	}
	if diff := cmp.Diff(want, held); diff != "" {
		t.Errorf("held at reset (-want +got):\n%s", diff)
	}
	if got := try("no window", t0.Add(-time.Hour+2*time.Second)); got != (note{0, time.Time{}, true}) {
		t.Errorf("first refusal after reset: %+v, want audited", got)
	}
	if len(r.Reset()) != 0 {
		t.Error("reset held a count of a kind with none held")
	}
}

// Refusal counts held when the gateway stops (no window open to write
// them as it closes) are written as it stops: none is lost.
func TestPairingRefusalsWrittenAtStop(t *testing.T) {
	g := startPairing(t, nil)
	p := g.g.pairing
	const n = 50
	for range n {
		if _, _, err, _ := p.psk([]byte(pairing.PAKEIdentityPrefix + "acme-t1")); !errors.Is(err, bridges.ErrPairingRefused) {
			t.Fatalf("no window: %v, want a pairing refusal", err)
		}
	}
	g.running.stop(t)
	g.running.done <- nil // for the cleanup's stop
	st, err := store.Open(filepath.Join(g.dir, "bastion.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	es, err := st.AuditLog(1000, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for i := len(es) - 1; i >= 0; i-- {
		if e := es[i]; e.Action == "pairing.session_refused" {
			got = append(got, e.Detail)
		}
	}
	if len(got) != 2 || !strings.HasPrefix(got[1], "no window: "+itoa(n-1)+" more refused since ") || !strings.HasSuffix(got[1], "(written as the gateway stopped)") {
		t.Fatalf("refusals audited (want the first, then %d more written at the stop):\n%s", n-1, strings.Join(got, "\n"))
	}
}

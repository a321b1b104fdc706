package pairing

import (
	"bytes"
	"crypto/rand"
	"errors"
	"flag"
	"os"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/pki/spake2plus"
)

var update = flag.Bool("update", false, "rewrite testdata seed files from the encoder")

const code = "3482-1177-9051"

func enroller(t *testing.T, r *rig, role Role) *Enroller {
	t.Helper()
	codes, err := NewCodes(role, testKDF, r.clk, func(e AuditEvent) { r.audits <- e })
	if err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"lamp-1", "lamp-2"} {
		if err := codes.Register(dev, []byte(code), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	return &Enroller{Window: r.w, Codes: codes, GatewayID: "bastion-gw-1", Rand: rand.Reader}
}

// device makes the device side as the factory would: from the code on its
// label, keeping only what its role needs.
func device(t *testing.T, id, labelCode string, role Role) *Device {
	t.Helper()
	s, err := DeriveSetupSecret([]byte(labelCode), id, testKDF)
	if err != nil {
		t.Fatal(err)
	}
	d := &Device{ID: id, Role: role, Rand: rand.Reader}
	if role == GatewayProver {
		d.Verifier = s.VerifierRecord()
	} else {
		d.Prover = s
	}
	return d
}

type transcript struct{ hello, round1, round2, done []byte }

// run drives one exchange and returns the gateway session, the messages,
// and both sides' PSKs (or the first error, and on which side).
func run(t *testing.T, e *Enroller, d *Device) (s *Session, tr transcript, gwPSK, devPSK []byte, err error) {
	t.Helper()
	if tr.hello, err = d.Hello(); err != nil {
		t.Fatal(err)
	}
	if s, tr.round1, err = e.Hello(tr.hello); err != nil {
		return nil, tr, nil, nil, err
	}
	if tr.round2, err = d.Round1(tr.round1); err != nil {
		return s, tr, nil, nil, err
	}
	var gwID string
	if tr.done, gwID, gwPSK, err = s.Finish(tr.round2); err != nil {
		return s, tr, nil, nil, err
	}
	devID, devPSK, gwName, err := d.Done(tr.done)
	if err != nil {
		return s, tr, nil, nil, err
	}
	if gwID != devID || gwName != "bastion-gw-1" {
		t.Fatalf("psk identities %q vs %q, gateway %q", gwID, devID, gwName)
	}
	return s, tr, gwPSK, devPSK, nil
}

func TestSetupCodeEnrollmentBothRoles(t *testing.T) {
	for name, role := range map[string]Role{"gateway prover": GatewayProver, "gateway verifier": GatewayVerifier} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, Config{})
			e := enroller(t, r, role)
			r.open()
			s, _, gw, dev, err := run(t, e, device(t, "lamp-1", code, role))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(gw, dev) || len(gw) != 32 {
				t.Fatalf("PSKs differ: %x %x", gw, dev)
			}
			// EST /sen would run here over DTLS-PSK; then the commit.
			if err := s.Succeed(); err != nil {
				t.Fatal(err)
			}
			if e := r.wait(StepClosed); e.Reason != ReasonEnrolled || e.Device != "lamp-1" {
				t.Fatalf("close %+v", e)
			}
			if _, err := e.Codes.Lookup("lamp-1"); !errors.Is(err, ErrNoCode) {
				t.Fatalf("code kept after enrollment: %v", err)
			}
		})
	}
}

func TestSetupCodeEnrollmentRefusals(t *testing.T) {
	for name, role := range map[string]Role{"gateway prover": GatewayProver, "gateway verifier": GatewayVerifier} {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, Config{})
			e := enroller(t, r, role)
			// No window: refused before any cryptography.
			if _, _, _, _, err := run(t, e, device(t, "lamp-1", code, role)); !errors.Is(err, ErrClosed) {
				t.Fatalf("no window: %v", err)
			}
			r.open()
			// A wrong code fails confirmation and counts once.
			_, good, _, _, _ := run(t, e, device(t, "lamp-1", code, role))
			bad, _, _, _, err := run(t, e, device(t, "lamp-1", "3482-1177-9052", role))
			if !errors.Is(err, spake2plus.ErrConfirmation) {
				t.Fatalf("wrong code: %v", err)
			}
			if role == GatewayVerifier {
				// Here the device, as prover, checks confirmV first and
				// gives up; the gateway's attempt stays pending until the
				// device's round 2 (any bytes) or the window's end.
				if st := r.w.State(); st.Enrolling != "lamp-1" || st.Failures != 1 {
					t.Fatalf("state %+v", st)
				}
				junk, _ := PAKEMessage{Type: MsgRound2, Confirm: make([]byte, 32)}.MarshalBinary()
				if _, _, _, err := bad.Finish(junk); !errors.Is(err, spake2plus.ErrConfirmation) {
					t.Fatalf("junk confirmP: %v", err)
				}
			}
			if st := r.w.State(); !st.Open || st.Failures != 2 { // the good run above was superseded, then the wrong code failed
				t.Fatalf("state %+v", st)
			}
			// A device with no registered code.
			if _, _, _, _, err := run(t, e, device(t, "lamp-9", code, role)); !errors.Is(err, ErrNoCode) {
				t.Fatalf("unknown device: %v", err)
			}
			// Replay: the first (successful) run's round 2 against a new
			// session fails, because the gateway's share is fresh.
			d := device(t, "lamp-1", code, role)
			hello, _ := d.Hello()
			s, _, err := e.Hello(hello)
			if err != nil {
				t.Fatal(err)
			}
			if _, _, _, err := s.Finish(good.round2); err == nil {
				t.Fatal("replayed round 2 accepted")
			}
			if _, _, _, err := s.Finish(good.round2); !errors.Is(err, spake2plus.ErrUsed) {
				t.Fatalf("second Finish: %v", err)
			}
			// Overlap: lamp-1 is mid-exchange when lamp-2 says hello.
			d1 := device(t, "lamp-1", code, role)
			h1, _ := d1.Hello()
			s1, _, err := e.Hello(h1)
			if err != nil {
				t.Fatal(err)
			}
			h2, _ := device(t, "lamp-2", code, role).Hello()
			if _, _, err := e.Hello(h2); !errors.Is(err, ErrSessionOverlap) {
				t.Fatalf("overlap: %v", err)
			}
			if err := s1.Attempt().Succeed(); !errors.Is(err, ErrSessionOverlap) {
				t.Fatalf("first device after overlap: %v", err)
			}
		})
	}
}

func TestEnrollerRefusesMalformed(t *testing.T) {
	r := newRig(t, Config{})
	e := enroller(t, r, GatewayProver)
	r.open()
	round1, _ := PAKEMessage{Type: MsgRound1, ID: []byte("x"), Share: make([]byte, 65)}.MarshalBinary()
	withShare, _ := PAKEMessage{Type: MsgHello, ID: []byte("lamp-1"), Share: make([]byte, 65)}.MarshalBinary()
	for name, msg := range map[string][]byte{"empty": nil, "round1 as hello": round1} {
		if _, _, err := e.Hello(msg); !errors.Is(err, ErrMalformedPAKE) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, _, err := e.Hello(withShare); !errors.Is(err, ErrMalformedPAKE) {
		t.Errorf("share in hello for a prover gateway: %v", err)
	}
	if st := r.w.State(); st.Failures != 1 {
		t.Errorf("failures %d, want 1 (the misplaced share)", st.Failures)
	}
}

func TestEnrollmentPSK(t *testing.T) {
	k := bytes.Repeat([]byte{7}, 32)
	id1, p1, _ := EnrollmentPSK(k, "lamp-1")
	id2, p2, _ := EnrollmentPSK(k, "lamp-2")
	if id1 != "bastion-enroll:lamp-1" || bytes.Equal(p1, p2) || bytes.Equal(p1, k) {
		t.Fatalf("psk not bound to device: %q %x %x", id1, p1, p2)
	}
	_ = id2
	if _, _, err := EnrollmentPSK(k[:31], "lamp-1"); err == nil {
		t.Fatal("short key accepted")
	}
}

func seedMessages() []PAKEMessage {
	share := bytes.Repeat([]byte{4}, 65)
	conf := bytes.Repeat([]byte{9}, 32)
	return []PAKEMessage{
		{Type: MsgHello, ID: []byte("lamp-1")},
		{Type: MsgHello, ID: []byte("lamp-1"), Share: share},
		{Type: MsgRound1, ID: []byte("bastion-gw-1"), Share: share},
		{Type: MsgRound1, ID: []byte("bastion-gw-1"), Share: share, Confirm: conf},
		{Type: MsgRound2, Share: share, Confirm: conf},
		{Type: MsgRound2, Confirm: conf},
		{Type: MsgDone, Confirm: conf},
		{Type: MsgDone},
	}
}

const seedFile = "testdata/pake-messages.bin"

// TestPAKESeedFile keeps the fuzz seeds equal to the encoder's output: a
// sequence of u16-length-prefixed messages.
func TestPAKESeedFile(t *testing.T) {
	var want []byte
	for _, m := range seedMessages() {
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var back PAKEMessage
		if err := back.UnmarshalBinary(b); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(m, back); diff != "" {
			t.Fatalf("round trip (-want +got):\n%s", diff)
		}
		want = append(want, byte(len(b)>>8), byte(len(b)))
		want = append(want, b...)
	}
	if *update {
		os.MkdirAll("testdata", 0o755)
		os.WriteFile(seedFile, want, 0o644)
	}
	got, err := os.ReadFile(seedFile)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s differs from encoder output (go test -run TestPAKESeedFile -update): %v", seedFile, err)
	}
	for name, b := range map[string][]byte{
		"version":  {2, 1, 0, 0, 0, 0, 0, 0},
		"type":     {1, 9, 0, 0, 0, 0, 0, 0},
		"trailing": {1, 1, 0, 0, 0, 0, 0, 0, 0},
		"short":    {1, 1, 0, 0, 0},
		"share 64": append([]byte{1, 1, 0, 0, 0, 64}, append(make([]byte, 64), 0, 0)...),
		"long":     {1, 1, 0xff, 0xff},
	} {
		if err := new(PAKEMessage).UnmarshalBinary(b); !errors.Is(err, ErrMalformedPAKE) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := (PAKEMessage{Type: MsgHello, ID: make([]byte, 300)}).MarshalBinary(); err == nil {
		t.Error("oversized field encoded")
	}
}

// FuzzPAKEMessage: decoding never panics, and what decodes re-encodes to
// the same bytes.
func FuzzPAKEMessage(f *testing.F) {
	b, err := os.ReadFile(seedFile)
	if err != nil {
		f.Fatal(err)
	}
	for len(b) >= 2 {
		n := int(b[0])<<8 | int(b[1])
		f.Add(b[2 : 2+n])
		b = b[2+n:]
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var m PAKEMessage
		if m.UnmarshalBinary(b) != nil {
			return
		}
		enc, err := m.MarshalBinary()
		if err != nil || !bytes.Equal(enc, b) {
			t.Fatalf("%x decoded to %+v re-encodes to %x (%v)", b, m, enc, err)
		}
	})
}

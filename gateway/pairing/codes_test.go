package pairing

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/bastion-iot/bastion/internal/clock"
	"github.com/bastion-iot/bastion/pki/spake2plus"
)

var testKDF = spake2plus.KDFParams{N: 1024, R: 8, P: 1}

func newCodes(t *testing.T, role Role) (*Codes, *clock.Fake, *[]AuditEvent) {
	t.Helper()
	clk := clock.NewFake(epoch)
	var audits []AuditEvent
	c, err := NewCodes(role, testKDF, clk, func(e AuditEvent) { audits = append(audits, e) })
	if err != nil {
		t.Fatal(err)
	}
	return c, clk, &audits
}

// exchange runs SPAKE2+ between the gateway's record and a device whose
// factory derived its own record from deviceCode, independently.
func exchange(t *testing.T, rec CodeRecord, gatewayID, deviceID string, deviceCode string) error {
	t.Helper()
	devSecret, err := DeriveSetupSecret([]byte(deviceCode), deviceID, testKDF)
	if err != nil {
		t.Fatal(err)
	}
	ctx := SPAKEContext(rec.Role, gatewayID, deviceID)
	var prover *spake2plus.ProverSecret
	var verifier *spake2plus.VerifierRecord
	if rec.Role == GatewayProver {
		prover, verifier = rec.Prover, devSecret.VerifierRecord() // device holds only (w0, L)
	} else {
		prover, verifier = devSecret, rec.Verifier
	}
	p, shareP, err := spake2plus.NewProver(ctx, prover, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	v, shareV, confirmV, err := spake2plus.NewVerifier(ctx, verifier, shareP, rand.Reader)
	if err != nil {
		return err
	}
	confirmP, pk, err := p.Finish(shareV, confirmV)
	if err != nil {
		return err
	}
	vk, err := v.Finish(confirmP)
	if err != nil {
		return err
	}
	if !bytes.Equal(pk, vk) {
		t.Fatal("keys differ after confirmation")
	}
	return nil
}

func TestSetupCodeBothRoles(t *testing.T) {
	for name, role := range map[string]Role{"gateway prover": GatewayProver, "gateway verifier": GatewayVerifier} {
		t.Run(name, func(t *testing.T) {
			c, _, audits := newCodes(t, role)
			code := []byte("3482-1177-9051")
			if err := c.Register("lamp-7", code, time.Hour); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(code, make([]byte, len(code))) {
				t.Fatal("Register left the code in the caller's buffer")
			}
			rec, err := c.Lookup("lamp-7")
			if err != nil {
				t.Fatal(err)
			}
			if (rec.Prover != nil) != (role == GatewayProver) {
				t.Fatalf("role %d keeps prover secret: %v", role, rec.Prover != nil)
			}
			if err := exchange(t, rec, "bastion-gw", "lamp-7", "3482-1177-9051"); err != nil {
				t.Fatalf("right code: %v", err)
			}
			if err := exchange(t, rec, "bastion-gw", "lamp-7", "3482-1177-9052"); !errors.Is(err, spake2plus.ErrConfirmation) {
				t.Fatalf("wrong code: %v", err)
			}
			if (*audits)[0].Step != StepCodeRegistered || strings.Contains((*audits)[0].Detail, "3482") {
				t.Fatalf("audit %+v", (*audits)[0])
			}
		})
	}
}

func TestSetupCodeExpiryAndRemoval(t *testing.T) {
	c, clk, audits := newCodes(t, GatewayProver)
	if err := c.Register("lamp-1", []byte("11112222"), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Register("lamp-2", []byte("33334444"), time.Hour); err != nil {
		t.Fatal(err)
	}
	want := []CodeInfo{{"lamp-1", epoch.Add(DefaultTTL)}, {"lamp-2", epoch.Add(time.Hour)}}
	if diff := cmp.Diff(want, c.List()); diff != "" {
		t.Fatalf("list (-want +got):\n%s", diff)
	}
	clk.Advance(time.Hour)
	if _, err := c.Lookup("lamp-2"); !errors.Is(err, ErrCodeExpired) {
		t.Fatalf("expired: %v", err)
	}
	if _, err := c.Lookup("lamp-2"); !errors.Is(err, ErrNoCode) {
		t.Fatalf("expired record kept: %v", err)
	}
	if _, err := c.Lookup("lamp-1"); err != nil {
		t.Fatal(err)
	}
	c.Remove("lamp-1", "enrolled")
	if _, err := c.Lookup("lamp-1"); !errors.Is(err, ErrNoCode) {
		t.Fatalf("removed: %v", err)
	}
	var steps []Step
	for _, a := range *audits {
		steps = append(steps, a.Step)
	}
	wantSteps := []Step{StepCodeRegistered, StepCodeRegistered, StepCodeExpired, StepCodeUnknown, StepCodeRemoved, StepCodeUnknown}
	if diff := cmp.Diff(wantSteps, steps); diff != "" {
		t.Fatalf("audit steps (-want +got):\n%s", diff)
	}
}

func TestSetupCodeRefusals(t *testing.T) {
	c, _, _ := newCodes(t, GatewayProver)
	cases := map[string]struct {
		dev  string
		code string
		ttl  time.Duration
		want string
	}{
		"short code":   {"lamp", "1234567", time.Hour, "want 8 to 64"},
		"long code":    {"lamp", strings.Repeat("1", 65), time.Hour, "want 8 to 64"},
		"no device":    {"", "12345678", time.Hour, "device id"},
		"long device":  {strings.Repeat("d", 129), "12345678", time.Hour, "device id"},
		"bad utf8":     {"\xff", "12345678", time.Hour, "device id"},
		"ttl too long": {"lamp", "12345678", 31 * 24 * time.Hour, "validity"},
		"ttl negative": {"lamp", "12345678", -time.Second, "validity"},
	}
	for name, tc := range cases {
		err := c.Register(tc.dev, []byte(tc.code), tc.ttl)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", name, err, tc.want)
		}
	}
	if _, err := NewCodes(GatewayProver, spake2plus.KDFParams{N: 3, R: 1, P: 1}, clock.NewFake(epoch), func(AuditEvent) {}); err == nil {
		t.Error("NewCodes accepted N=3")
	}
}

func TestCodeRecordStorage(t *testing.T) {
	for _, role := range []Role{GatewayProver, GatewayVerifier} {
		c, _, _ := newCodes(t, role)
		if err := c.Register("lamp-9", []byte("55556666"), time.Hour); err != nil {
			t.Fatal(err)
		}
		rec, _ := c.Lookup("lamp-9")
		b, err := rec.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var back CodeRecord
		if err := back.UnmarshalBinary(b); err != nil {
			t.Fatal(err)
		}
		if back.Device != rec.Device || !back.Expires.Equal(rec.Expires) || back.Role != role ||
			!bytes.Equal(back.Verifier.L(), rec.Verifier.L()) {
			t.Fatalf("round trip: %+v vs %+v", back, rec)
		}
		c2, _, _ := newCodes(t, role)
		if err := c2.Restore(back); err != nil {
			t.Fatal(err)
		}
		got, err := c2.Lookup("lamp-9")
		if err != nil {
			t.Fatal(err)
		}
		if err := exchange(t, got, "gw", "lamp-9", "55556666"); err != nil {
			t.Fatalf("restored record: %v", err)
		}
		for name, bad := range map[string][]byte{"empty": nil, "version": append([]byte{2}, b[1:]...), "truncated": b[:len(b)-1], "role": append([]byte{1, 7}, b[2:]...)} {
			if err := new(CodeRecord).UnmarshalBinary(bad); err == nil {
				t.Errorf("role %d %s: accepted", role, name)
			}
		}
	}
}

func TestSetupSaltPerDevice(t *testing.T) {
	if bytes.Equal(SetupSalt("a"), SetupSalt("b")) || len(SetupSalt("a")) != spake2plus.MinSaltSize {
		t.Fatal("salt not per device or wrong size")
	}
}

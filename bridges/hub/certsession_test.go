package hub

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/pki"
)

// A certificate retired by a renewal is counted cert_retired wherever it
// is refused: at a handshake (CertRefusal; pki.VerifyDevice's error for it
// is a revocation's too) and when its session is ended (CertEnd); a
// revoked one revoked.
func TestCertReasons(t *testing.T) {
	retired := fmt.Errorf("device d certificate 01: %w, refused as %w", pki.ErrCertRetired, pki.ErrRevoked)
	revoked := fmt.Errorf("device d certificate 01: %w", pki.ErrRevoked)
	for _, tc := range []struct {
		err       error
		handshake string // CertRefusal
		session   string // CertEnd
	}{
		{retired, ReasonCertRetired, ReasonCertRetired},
		{revoked, ReasonRevoked, ReasonRevoked},
		{x509.CertificateInvalidError{Reason: x509.Expired}, ReasonExpired, ReasonExpired},
	} {
		if got := CertRefusal(tc.err); got != tc.handshake {
			t.Errorf("CertRefusal(%v) = %q, want %q", tc.err, got, tc.handshake)
		}
		if got, _, _ := CertEnd(tc.err); got != tc.session {
			t.Errorf("CertEnd(%v) = %q, want %q", tc.err, got, tc.session)
		}
	}
}

// CertSessionEnded counts one end under the transport and CertEnd's
// reason, and logs one line that names the device, the certificate, the
// reason and what the device must do.
func TestCertSessionEnded(t *testing.T) {
	m, err := newMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(&out, nil))
	cert := &SessionCert{Serial: "0a1b", NotAfter: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	why := CertSessionEnded(m, log, CoAP, "dev-a", "192.0.2.1:5684", cert, fmt.Errorf("device dev-a certificate 0a1b: %w", pki.ErrCertRetired))
	if want := "its certificate was replaced by a renewal (retired)"; why != want {
		t.Errorf("why = %q, want %q", why, want)
	}
	if n := testutil.ToFloat64(m.Refused.WithLabelValues(CoAP, ReasonCertRetired)); n != 1 {
		t.Errorf("refusals{coap,cert_retired} = %v, want 1", n)
	}
	line := out.String()
	for _, part := range []string{`msg="coap: session closed: its certificate was replaced by a renewal (retired); the device must connect with its renewed certificate`,
		"device=dev-a", "serial=0a1b", "not_after=2030-01-02T03:04:05Z", "reason=cert_retired", "remote=192.0.2.1:5684"} {
		if !strings.Contains(line, part) {
			t.Errorf("log line %q lacks %q", line, part)
		}
	}
	if n := strings.Count(line, "\n"); n != 1 {
		t.Errorf("%d log lines, want 1", n)
	}
}

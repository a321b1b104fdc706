package coap_test

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

// caIdentity is the gateway's certificate check (a pki.CA, on a settable
// clock) without its store, and the PSK device "dev-psk" (identity
// "id-psk").
type caIdentity struct {
	ca  *pki.CA
	key []byte
}

func (i *caIdentity) VerifyCert(raw [][]byte) (string, error) {
	dev, _, err := i.ca.VerifyDevice(raw)
	return dev, err
}

func (i *caIdentity) PSK(identity []byte) (string, []byte, error) {
	if string(identity) != "id-psk" {
		return "", nil, errors.New("unknown PSK identity")
	}
	return "dev-psk", i.key, nil
}

func (i *caIdentity) CheckSecret(string, []byte) error { return errors.New("no secrets") }
func (i *caIdentity) OnRevoke(func(string))            {}
func (i *caIdentity) CertValid(device, serial string, notAfter time.Time) error {
	return i.ca.CertValid(device, serial, notAfter)
}

// certSweep is the sweep interval of these tests; certEndWithin bounds
// how long a session may outlive its certificate, generous for a loaded
// machine (the sweep closes it within one interval).
const (
	certSweep     = 50 * time.Millisecond
	certEndWithin = 3 * time.Second
)

type certRig struct {
	s        *coap.Server
	sink     *countSink
	ca       *pki.CA
	clk      *testpki.OffsetClock
	lines    *coap.LogLines
	roots    *x509.CertPool
	certAddr string
	pskDev   *devicesim.Device
	pskAddr  string
}

// newCertRig runs a server whose devices' certificates come from a CA on
// a settable clock, sweeping every certSweep, its log kept.
func newCertRig(t *testing.T) *certRig {
	t.Helper()
	r, _ := newCertRigWith(t, func(id *caIdentity) bridges.Identity { return id }, "")
	return r
}

// newCertRigWith is newCertRig whose server has the identity ident makes
// of the rig's, and logs through a logbuf.Hook for the lines starting with
// hookPrefix.
func newCertRigWith(t *testing.T, ident func(*caIdentity) bridges.Identity, hookPrefix string) (*certRig, *logbuf.Hook) {
	t.Helper()
	clk := &testpki.OffsetClock{}
	ca, err := pki.Open(filepath.Join(t.TempDir(), "devices"), "test", clk, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	r := &certRig{ca: ca, clk: clk, lines: &coap.LogLines{}, sink: &countSink{}}
	id := &caIdentity{ca: ca, key: []byte("0123456789abcdef")}
	hook := logbuf.NewHook(r.lines, hookPrefix)
	var certDev *devicesim.Device
	r.s, r.pskDev, certDev, r.pskAddr, r.certAddr, _ = startWith(t, ident(id), r.sink, coap.Config{CertSweep: certSweep}, slog.New(hook), 0)
	r.roots = certDev.Roots
	return r, hook
}

// device is device id with a certificate of the rig's CA, valid for an
// hour, and its leaf.
func (r *certRig) device(t *testing.T, id string) (*devicesim.Device, *x509.Certificate) {
	t.Helper()
	keyPEM, csrPEM, err := devicesim.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.ParseCSR(csrPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := r.ca.IssueDevice(csr, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	d := &devicesim.Device{Creds: devicesim.Creds{ID: id, Auth: "cert", CertPEM: string(pki.CertPEM(leaf)), KeyPEM: string(keyPEM)}, Roots: r.roots}
	return d, leaf
}

// open starts a session of d on addr and checks that it is answered.
func open(t *testing.T, d *devicesim.Device, addr string) *devicesim.CoAP {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatalf("session of %s: %v", d.ID, err)
	}
	t.Cleanup(func() { c.Close() })
	if !answers(c) {
		t.Fatalf("session of %s not answered", d.ID)
	}
	return c
}

// answers reports whether the session answers a request.
func answers(c *devicesim.CoAP) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := c.Do(ctx, codes.GET, "/.well-known/core", nil, -1)
	return err == nil && r.Code == codes.Content
}

// endedWithin fails unless the gateway ends c within certEndWithin.
func endedWithin(t *testing.T, c *devicesim.CoAP, what string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(certEndWithin):
		t.Fatalf("session still open %v after %s", certEndWithin, what)
	}
}

func (r *certRig) refusals(reason string) float64 {
	return testutil.ToFloat64(coap.HubOf(r.s).Metrics().Refused.WithLabelValues(hub.CoAP, reason))
}

// logged fails unless exactly one line starting with msg has these
// attributes.
func (r *certRig) logged(t *testing.T, msg string, attrs map[string]string) {
	t.Helper()
	n := 0
	for _, a := range r.lines.Attrs(msg) {
		ok := true
		for k, v := range attrs {
			ok = ok && a[k] == v
		}
		if ok {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d lines %q with %v, want 1 (lines: %v)", n, msg, attrs, r.lines.Attrs(msg))
	}
}

// refusedNow reports whether a new handshake with d is refused.
func refusedNow(t *testing.T, d *devicesim.Device, addr string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialCoAP(ctx, addr)
	if err != nil {
		return true
	}
	defer c.Close()
	return !answers(c)
}

// TestCertSessionEndsWhenCertificateExpires: a DTLS session on a
// certificate ends within a few sweeps once the gateway's clock passes the
// certificate's NotAfter (counted as cert_expired, one log line with the
// device, the serial and what to do), and a new handshake with the
// certificate is refused; a PSK session is left alone, as is the
// certificate session while its certificate is valid. Before, the
// handshake's check was the only one: the session lived on as long as the
// device kept it from idling out.
func TestCertSessionEndsWhenCertificateExpires(t *testing.T) {
	r := newCertRig(t)
	d, leaf := r.device(t, "dev-a")
	c := open(t, d, r.certAddr)
	p := open(t, r.pskDev, r.pskAddr)

	time.Sleep(5 * certSweep)
	if !answers(c) {
		t.Fatal("session on a valid certificate closed")
	}

	r.clk.Set(2 * time.Hour)
	endedWithin(t, c, "its certificate expired")
	if n := r.s.Sessions("dev-a"); n != 0 {
		t.Errorf("sessions of dev-a: %d, want 0", n)
	}
	if got := r.refusals(hub.ReasonExpired); got != 1 {
		t.Errorf("cert_expired refusals %v, want 1", got)
	}
	r.logged(t, "coap: session closed: its certificate expired; the device must enroll again", map[string]string{
		"device": "dev-a", "serial": pki.Serial(leaf), "reason": hub.ReasonExpired})
	time.Sleep(5 * certSweep)
	if !answers(p) {
		t.Error("PSK session closed by the certificate sweep")
	}
	if !refusedNow(t, d, r.certAddr) {
		t.Error("expired certificate accepted at a new handshake")
	}
}

// TestCertSessionEndsWhenCertificateRetired: of a device's two sessions,
// the one on a certificate whose serial is retired (renewed: RetireSerial)
// ends within a few sweeps once the retirement time comes, not before,
// counted as cert_retired, and a new handshake with that certificate is
// refused, while the session on the device's other, valid certificate
// stays up, until that certificate's serial is revoked (RevokeSerial,
// which tells no subscriber), counted as revoked. Before, a retired or
// revoked serial was refused only at the next handshake.
func TestCertSessionEndsWhenCertificateRetired(t *testing.T) {
	r := newCertRig(t)
	revs := r.ca.Revocations()
	d1, leaf1 := r.device(t, "dev-a")
	d2, leaf2 := r.device(t, "dev-a")
	c1 := open(t, d1, r.certAddr)
	c2 := open(t, d2, r.certAddr)
	if n := r.s.Sessions("dev-a"); n != 2 {
		t.Fatalf("sessions of dev-a: %d, want 2", n)
	}

	// Retired from an hour on (a renewal's grace): nothing ends yet.
	revs.RetireSerial(pki.Serial(leaf1), r.clk.Now().Add(time.Hour))
	time.Sleep(5 * certSweep)
	if !answers(c1) {
		t.Fatal("session closed before its certificate's retirement time")
	}

	revs.RetireSerial(pki.Serial(leaf1), r.clk.Now())
	endedWithin(t, c1, "its certificate was retired")
	if got := r.refusals(hub.ReasonCertRetired); got != 1 {
		t.Errorf("cert_retired refusals %v, want 1", got)
	}
	r.logged(t, "coap: session closed: its certificate was replaced by a renewal (retired); the device must connect with its renewed certificate", map[string]string{
		"device": "dev-a", "serial": pki.Serial(leaf1), "reason": hub.ReasonCertRetired})
	time.Sleep(5 * certSweep)
	if !answers(c2) {
		t.Fatal("session on the device's other, valid certificate closed")
	}
	if n := r.s.Sessions("dev-a"); n != 1 {
		t.Errorf("sessions of dev-a: %d, want 1", n)
	}
	if !refusedNow(t, d1, r.certAddr) {
		t.Error("retired certificate accepted at a new handshake")
	}

	before := r.refusals(hub.ReasonRevoked)
	revs.RevokeSerial(pki.Serial(leaf2))
	endedWithin(t, c2, "its certificate was revoked")
	if got := r.refusals(hub.ReasonRevoked); got != before+1 {
		t.Errorf("revoked refusals %v, want %v", got, before+1)
	}
	r.logged(t, "coap: session closed: its certificate or device was revoked", map[string]string{
		"device": "dev-a", "serial": pki.Serial(leaf2), "reason": hub.ReasonRevoked})
	if n := r.s.Sessions("dev-a"); n != 0 {
		t.Errorf("sessions of dev-a: %d, want 0", n)
	}
}

// TestRetiredCertificateRefusedAtHandshakeAsRetired: a handshake with a
// certificate retired by a renewal is refused and counted as
// cert_retired, as the sweep counts the session such a certificate had
// open, with its log line saying so; not as revoked. Before, the
// certificate check's error was a revocation's only (pki.VerifyDevice),
// and the refusal was counted as revoked.
func TestRetiredCertificateRefusedAtHandshakeAsRetired(t *testing.T) {
	r := newCertRig(t)
	d, leaf := r.device(t, "dev-a")
	r.ca.Revocations().RetireSerial(pki.Serial(leaf), r.clk.Now())
	if !refusedNow(t, d, r.certAddr) {
		t.Fatal("retired certificate accepted at a handshake")
	}
	if got := r.refusals(hub.ReasonCertRetired); got != 1 {
		t.Errorf("cert_retired refusals %v, want 1", got)
	}
	if got := r.refusals(hub.ReasonRevoked); got != 0 {
		t.Errorf("revoked refusals %v, want 0", got)
	}
	r.logged(t, "coap: handshake refused: device certificate not accepted", map[string]string{
		"device": "dev-a", "reason": hub.ReasonCertRetired})
}

// sweptIdentity is caIdentity with the CA's device revocations told to
// the server (OnRevoke), as the gateway's are, and a function that runs
// inside the next certificate check (CertValid: the sweep's, between its
// snapshot of the sessions and its count), once stored in inCheck.
type sweptIdentity struct {
	*caIdentity
	inCheck atomic.Pointer[func(device string)]
}

func (i *sweptIdentity) OnRevoke(f func(string)) { i.ca.Revocations().Subscribe(f) }

func (i *sweptIdentity) CertValid(device, serial string, notAfter time.Time) error {
	if f := i.inCheck.Swap(nil); f != nil {
		(*f)(device)
	}
	return i.caIdentity.CertValid(device, serial, notAfter)
}

// TestRevokedSessionEndCountedOnce: the end of the session of a device
// that is revoked is counted once, as revoked, whether the revocation
// alone ends it, or lands while the certificate sweep checks the session
// (after the sweep's snapshot, before its count), or right after the
// sweep counted the session (its serial revoked) and before the sweep
// closed it. Before, a revocation counted nothing (revoke closed the
// sessions uncounted; the end was counted only if the sweep happened to
// find the session before its close went through), and the sweep and
// revoke each took sessions out of byDevice and closed them their own
// way.
func TestRevokedSessionEndCountedOnce(t *testing.T) {
	const revokedLine = "coap: session closed: its certificate or device was revoked"
	for _, tc := range []struct {
		name string
		end  func(r *certRig, id *sweptIdentity, hook *logbuf.Hook, serial string)
	}{
		{"revocation", func(r *certRig, _ *sweptIdentity, _ *logbuf.Hook, _ string) {
			r.ca.Revocations().RevokeDevice("dev-a")
		}},
		{"revocation during the sweep's check", func(r *certRig, id *sweptIdentity, _ *logbuf.Hook, _ string) {
			revoke := func(dev string) { r.ca.Revocations().RevokeDevice(dev) }
			id.inCheck.Store(&revoke)
		}},
		{"revocation after the sweep counted", func(r *certRig, _ *sweptIdentity, hook *logbuf.Hook, serial string) {
			hook.Arm(func() { r.ca.Revocations().RevokeDevice("dev-a") })
			r.ca.Revocations().RevokeSerial(serial)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var id *sweptIdentity
			r, hook := newCertRigWith(t, func(ci *caIdentity) bridges.Identity {
				id = &sweptIdentity{caIdentity: ci}
				return id
			}, revokedLine)
			d, leaf := r.device(t, "dev-a")
			c := open(t, d, r.certAddr)
			tc.end(r, id, hook, pki.Serial(leaf))
			endedWithin(t, c, tc.name)
			time.Sleep(5 * certSweep) // a second count would come within a sweep or two
			if got := r.refusals(hub.ReasonRevoked); got != 1 {
				t.Errorf("revoked refusals %v, want 1", got)
			}
			if n := r.s.Sessions("dev-a"); n != 0 {
				t.Errorf("sessions of dev-a: %d, want 0", n)
			}
		})
	}
}

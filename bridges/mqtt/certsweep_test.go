package mqtt

import (
	"bufio"
	"crypto/tls"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

// certSweep is the sweep interval of these tests; certEndWithin bounds
// how long a session may outlive its certificate, generous for a loaded
// machine (the sweep closes it within one interval).
const (
	certSweep     = 50 * time.Millisecond
	certEndWithin = 3 * time.Second
)

// newCertRig is a rig whose CA runs on a settable clock, whose sweep runs
// every certSweep, which accepts the secret "s3cret" for any device, and
// whose log is kept.
func newCertRig(t *testing.T) (*rig, *testpki.OffsetClock, *logbuf.Buffer) {
	t.Helper()
	r, clk, lb, _ := newCertRigWith(t, func(_ *pki.CA, id bridges.Identity) bridges.Identity { return id }, "")
	return r, clk, lb
}

// newCertRigWith is newCertRig whose server has the identity ident makes
// of the rig's (and its CA), and logs through a logbuf.Hook for the lines
// starting with hookPrefix.
func newCertRigWith(t *testing.T, ident func(*pki.CA, bridges.Identity) bridges.Identity, hookPrefix string) (*rig, *testpki.OffsetClock, *logbuf.Buffer, *logbuf.Hook) {
	t.Helper()
	clk := &testpki.OffsetClock{}
	lb := &logbuf.Buffer{}
	hook := logbuf.NewHook(slog.NewTextHandler(lb, nil), hookPrefix)
	var checks atomic.Int32
	r := newRigClock(t, queue.Options{}, Config{AllowSecretAuth: true, CertSweep: certSweep}, func(ca *pki.CA) bridges.Identity {
		return ident(ca, countingIdentity{caIdentity{ca}, &checks})
	}, clk, slog.New(hook))
	return r, clk, lb, hook
}

// connectCert connects device id with cert and reports the CONNACK's
// reason code, or ok false if the connection ended without one (a
// certificate refused in the TLS 1.3 handshake shows at the client's
// first read, or already in its handshake).
func (r *rig) connectCert(t *testing.T, id string, ver byte, cert tls.Certificate) (d *device, code byte, ok bool) {
	t.Helper()
	c, err := r.tlsDial(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1",
		Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, 0, false
	}
	t.Cleanup(func() { c.Close() })
	d = &device{t: t, id: id, ver: ver, c: c, r: bufio.NewReader(c), mayBeClosed: true}
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}})
	pk, err := d.readErr(5 * time.Second)
	if err != nil || pk.FixedHeader.Type != packets.Connack {
		return d, 0, false
	}
	return d, pk.ReasonCode, true
}

// mustConnect is connectCert that fails the test unless the session is
// accepted.
func (r *rig) mustConnect(t *testing.T, id string, ver byte, cert tls.Certificate) *device {
	t.Helper()
	d, code, ok := r.connectCert(t, id, ver, cert)
	if !ok || code != 0 {
		t.Fatalf("%s: CONNACK %v reason %#x, want accepted", id, ok, code)
	}
	d.mayBeClosed = false
	return d
}

// endedWithin reads until the connection ends and fails if that takes
// longer than limit; it returns the reason code of the DISCONNECT the
// device got first (-1: none).
func (d *device) endedWithin(limit time.Duration, what string) int {
	d.t.Helper()
	deadline := time.Now().Add(limit)
	code := -1
	for {
		pk, err := d.readErr(time.Until(deadline))
		if isTimeout(err) {
			d.t.Fatalf("device %s: session still open %v after %s", d.id, limit, what)
		}
		if err != nil {
			return code
		}
		if pk.FixedHeader.Type != packets.Disconnect {
			d.t.Fatalf("device %s: got packet type %d (reason %#x) before the connection closed", d.id, pk.FixedHeader.Type, pk.ReasonCode)
		}
		if code < 0 {
			code = int(pk.ReasonCode)
		}
	}
}

// secretSession connects device id with the secret "s3cret".
func (r *rig) secretSession(t *testing.T, id string) *device {
	t.Helper()
	d := r.dialTLS(t, id, 5, false)
	d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id,
		Username: []byte(id), UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true}})
	if pk := d.read(5 * time.Second); pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != 0 {
		t.Fatalf("secret login of %s: type %d reason %#x", id, pk.FixedHeader.Type, pk.ReasonCode)
	}
	return d
}

// TestCertSessionEndsWhenCertificateExpires: a session on a certificate
// ends within a few sweeps once the gateway's clock passes the
// certificate's NotAfter (DISCONNECT 0x87 for MQTT 5, counted as
// cert_expired, one log line with the device, the serial and what to do),
// and the certificate is refused at the next CONNECT; a secret-login
// session is left alone, as is the certificate session while its
// certificate is valid. Before, the CONNECT's check was the only one: the
// session lived on as long as the device sent keepalives.
func TestCertSessionEndsWhenCertificateExpires(t *testing.T) {
	r, clk, lb := newCertRig(t)
	cert, leaf := r.issue(t, "deva") // valid for an hour
	a := r.mustConnect(t, "deva", 5, cert)
	s := r.secretSession(t, "devs")
	waitFor(t, "both sessions", func() bool { return r.s.SessionCount() == 2 })

	time.Sleep(5 * certSweep)
	if !a.open() {
		t.Fatal("session on a valid certificate closed")
	}
	a.mayBeClosed = false

	clk.Set(2 * time.Hour)
	if code := a.endedWithin(certEndWithin, "its certificate expired"); code != int(packets.ErrNotAuthorized.Code) {
		t.Errorf("DISCONNECT reason %#x, want 0x87 not authorized", code)
	}
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 1 })
	if got := r.refusals(hub.ReasonExpired); got != 1 {
		t.Errorf("cert_expired refusals %v, want 1", got)
	}
	serial := pki.Serial(leaf)
	if l := lb.Lines("mqtt: session closed: its certificate expired", "device=deva", "serial="+serial, "reason=cert_expired", "enroll again"); len(l) != 1 {
		t.Errorf("log lines for the session's end: %q, want 1", l)
	}
	time.Sleep(5 * certSweep)
	if !s.open() {
		t.Error("secret-login session closed by the certificate sweep")
	}

	if _, code, ok := r.connectCert(t, "deva", 5, cert); ok && code == 0 {
		t.Error("expired certificate accepted at a new CONNECT")
	}
	waitFor(t, "the new connection's refusal", func() bool { return r.refusals(hub.ReasonExpired) == 2 })
}

// TestCertSessionEndsWhenCertificateRetired: a session on a certificate
// whose serial is retired (renewed: RetireSerial) ends within a few sweeps
// once the retirement time comes, not before, counted as cert_retired;
// the certificate is refused at the next CONNECT, while the device's
// other, valid certificate connects and its session stays up, and another
// device's session is left alone until its own certificate's serial is
// revoked (RevokeSerial, which tells no subscriber), counted as revoked
// (MQTT 3.1.1: closed without a DISCONNECT). A device holds one MQTT
// session at a time, so its two certificates' sessions follow each other.
// Before, a retired or revoked serial was refused only at the next
// CONNECT.
func TestCertSessionEndsWhenCertificateRetired(t *testing.T) {
	r, clk, lb := newCertRig(t)
	revs := r.ca.Revocations()
	a1, a1leaf := r.issue(t, "deva")
	a2, _ := r.issue(t, "deva")
	b1, b1leaf := r.issue(t, "devb")
	a := r.mustConnect(t, "deva", 5, a1)
	b := r.mustConnect(t, "devb", 4, b1)
	waitFor(t, "both sessions", func() bool { return r.s.SessionCount() == 2 })

	// Retired from an hour on (a renewal's grace): nothing ends yet.
	revs.RetireSerial(pki.Serial(a1leaf), clk.Now().Add(time.Hour))
	time.Sleep(5 * certSweep)
	if !a.open() {
		t.Fatal("session closed before its certificate's retirement time")
	}
	a.mayBeClosed = false

	revs.RetireSerial(pki.Serial(a1leaf), clk.Now())
	if code := a.endedWithin(certEndWithin, "its certificate was retired"); code != int(packets.ErrNotAuthorized.Code) {
		t.Errorf("DISCONNECT reason %#x, want 0x87 not authorized", code)
	}
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 1 })
	if got := r.refusals(hub.ReasonCertRetired); got != 1 {
		t.Errorf("cert_retired refusals %v, want 1", got)
	}
	if l := lb.Lines("mqtt: session closed: its certificate was replaced by a renewal", "device=deva", "serial="+pki.Serial(a1leaf), "reason=cert_retired", "renewed certificate"); len(l) != 1 {
		t.Errorf("log lines for the session's end: %q, want 1", l)
	}
	if _, code, ok := r.connectCert(t, "deva", 5, a1); ok && code == 0 {
		t.Error("retired certificate accepted at a new CONNECT")
	}
	a = r.mustConnect(t, "deva", 5, a2)
	time.Sleep(5 * certSweep)
	if !a.open() {
		t.Error("session on the device's other, valid certificate closed")
	}
	if !b.open() {
		t.Fatal("another device's session closed")
	}
	b.mayBeClosed = false

	before := r.refusals(hub.ReasonRevoked)
	revs.RevokeSerial(pki.Serial(b1leaf))
	if code := b.endedWithin(certEndWithin, "its certificate was revoked"); code != -1 {
		t.Errorf("MQTT 3.1.1 session got a DISCONNECT %#x", code)
	}
	if got := r.refusals(hub.ReasonRevoked); got != before+1 {
		t.Errorf("revoked refusals %v, want %v", got, before+1)
	}
	if l := lb.Lines("mqtt: session closed: its certificate or device was revoked", "device=devb", "serial="+pki.Serial(b1leaf), "reason=revoked"); len(l) != 1 {
		t.Errorf("log lines for the session's end: %q, want 1", l)
	}
	a.mayBeClosed = true
	if !a.open() {
		t.Error("session on a valid certificate closed by another's revocation")
	}
}

// TestRetiredCertificateRefusedAtConnectAsRetired: a connection with a
// certificate retired by a renewal is refused and counted as cert_retired,
// as the sweep counts the session such a certificate had open, with its
// log line saying so; not as revoked. Before, the certificate check's
// error was a revocation's only (pki.VerifyDevice), and the refusal was
// counted as revoked.
func TestRetiredCertificateRefusedAtConnectAsRetired(t *testing.T) {
	r, clk, lb := newCertRig(t)
	cert, leaf := r.issue(t, "deva")
	r.ca.Revocations().RetireSerial(pki.Serial(leaf), clk.Now())
	if _, code, ok := r.connectCert(t, "deva", 5, cert); ok && code == 0 {
		t.Fatal("retired certificate accepted at CONNECT")
	}
	waitFor(t, "the refusal to be counted", func() bool { return r.refusals(hub.ReasonCertRetired) == 1 })
	if got := r.refusals(hub.ReasonRevoked); got != 0 {
		t.Errorf("revoked refusals %v, want 0", got)
	}
	if l := lb.Lines("mqtt: handshake refused: device certificate not accepted", "device=deva", "reason=cert_retired"); len(l) != 1 {
		t.Errorf("log lines for the refusal: %q, want 1", l)
	}
}

// sweptIdentity is the rig's identity with the CA's device revocations
// told to the server (OnRevoke), as the gateway's are, and a function that
// runs inside the next certificate check (CertValid: the sweep's, before
// it marks and counts the session), once stored in inCheck.
type sweptIdentity struct {
	bridges.Identity
	ca      *pki.CA
	inCheck atomic.Pointer[func(device string)]
}

func (i *sweptIdentity) OnRevoke(f func(string)) { i.ca.Revocations().Subscribe(f) }

func (i *sweptIdentity) CertValid(device, serial string, notAfter time.Time) error {
	if f := i.inCheck.Swap(nil); f != nil {
		(*f)(device)
	}
	return i.Identity.CertValid(device, serial, notAfter)
}

// TestRevokedSessionEndCountedOnce: the end of the session of a device
// that is revoked is counted once, as revoked, whether the revocation
// alone ends it, or lands while the certificate sweep checks the session
// (before the sweep marks it ended), or right after the sweep marked and
// counted the session (its serial revoked) and before it ended it. Before,
// the revocation (disconnect) counted a session the sweep had marked and
// counted already: it looked only at whether the session was closed.
func TestRevokedSessionEndCountedOnce(t *testing.T) {
	const revokedLine = "mqtt: session closed: its certificate or device was revoked"
	for _, tc := range []struct {
		name string
		end  func(r *rig, id *sweptIdentity, hook *logbuf.Hook, serial string)
	}{
		{"revocation", func(r *rig, _ *sweptIdentity, _ *logbuf.Hook, _ string) {
			r.ca.Revocations().RevokeDevice("deva")
		}},
		{"revocation during the sweep's check", func(r *rig, id *sweptIdentity, _ *logbuf.Hook, _ string) {
			revoke := func(dev string) { r.ca.Revocations().RevokeDevice(dev) }
			id.inCheck.Store(&revoke)
		}},
		{"revocation after the sweep counted", func(r *rig, _ *sweptIdentity, hook *logbuf.Hook, serial string) {
			hook.Arm(func() { r.ca.Revocations().RevokeDevice("deva") })
			r.ca.Revocations().RevokeSerial(serial)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := &sweptIdentity{}
			r, _, _, hook := newCertRigWith(t, func(ca *pki.CA, base bridges.Identity) bridges.Identity {
				id.Identity, id.ca = base, ca
				return id
			}, revokedLine)
			cert, leaf := r.issue(t, "deva")
			d := r.mustConnect(t, "deva", 5, cert)
			tc.end(r, id, hook, pki.Serial(leaf))
			d.endedWithin(certEndWithin, tc.name)
			waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
			time.Sleep(5 * certSweep) // a second count would come within a sweep or two
			if got := r.refusals(hub.ReasonRevoked); got != 1 {
				t.Errorf("revoked refusals %v, want 1", got)
			}
		})
	}
}

package mqtt

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/pki"
)

// countingIdentity accepts the secret "s3cret" for any device and counts
// the secret checks it was asked for (each an argon2id run in the gateway).
type countingIdentity struct {
	caIdentity
	checks *atomic.Int32
}

func (i countingIdentity) CheckSecret(_ string, secret []byte) error {
	i.checks.Add(1)
	switch string(secret) {
	case "s3cret":
		return nil
	case "revoked": // the gateway refuses a revoked device before hashing
		return fmt.Errorf("device: %w", pki.ErrRevoked)
	}
	return errors.New("wrong secret")
}

// secretLogin connects from the address from with device "devs" and
// secret, and returns the CONNACK's reason code.
func secretLogin(t *testing.T, r *rig, ver byte, from, secret string) byte {
	t.Helper()
	return secretLoginAs(t, r, ver, from, "devs", "devs", secret)
}

// secretLoginAs is secretLogin with a client id and a user name.
func secretLoginAs(t *testing.T, r *rig, ver byte, from, clientID, user, secret string) byte {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 10 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", r.addrFrom(from), &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: r.ca.RootPool(), ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatalf("TLS from %s: %v", from, err)
	}
	defer c.Close()
	dev := &device{t: t, id: clientID, ver: ver, c: c, r: bufio.NewReader(c)}
	dev.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: clientID,
		Username: []byte(user), UsernameFlag: true, Password: []byte(secret), PasswordFlag: true}})
	pk := dev.read(10 * time.Second)
	if pk.FixedHeader.Type != packets.Connack {
		t.Fatalf("got packet type %d, want CONNACK", pk.FixedHeader.Type)
	}
	return pk.ReasonCode
}

// TestSecretLockoutSparesRevokedKeepsFailures: a revoked device's refused
// logins (no argon2id run) do not lock its address out, so a revoked
// device retrying behind a shared address does not lock the others out
// for good; and a successful secret login from an address does not erase
// its failures. When it did, a right secret between every few wrong ones
// (19 and 1 with the defaults) was never locked out and kept both argon2id
// slots busy.
func TestSecretLockoutSparesRevokedKeepsFailures(t *testing.T) {
	var checks atomic.Int32
	r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true,
		SecretLockout: SecretLockout{Free: 3, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour}},
		func(ca *pki.CA) bridges.Identity { return countingIdentity{caIdentity{ca}, &checks} })
	for range 5 {
		if got := secretLogin(t, r, 5, "127.0.0.1", "revoked"); got != packets.ErrBadUsernameOrPassword.Code {
			t.Fatalf("revoked: CONNACK 0x%02x, want 0x%02x", got, packets.ErrBadUsernameOrPassword.Code)
		}
	}
	for i, step := range []struct {
		secret string
		want   byte
	}{
		{"s3cret", 0}, // five revoked refusals did not lock the address
		{"wrong", packets.ErrBadUsernameOrPassword.Code},
		{"wrong", packets.ErrBadUsernameOrPassword.Code},
		{"s3cret", 0}, // two failures, under Free: accepted
		{"wrong", packets.ErrBadUsernameOrPassword.Code}, // the third: locked
		{"s3cret", packets.ErrConnectionRateExceeded.Code},
	} {
		if got := secretLogin(t, r, 5, "127.0.0.1", step.secret); got != step.want {
			t.Fatalf("step %d, secret %q: CONNACK 0x%02x, want 0x%02x", i, step.secret, got, step.want)
		}
	}
	if got := r.refusals(hub.ReasonSecretLockout); got != 1 {
		t.Errorf("secret_lockout refusals %v, want 1", got)
	}
}

// A successful secret login from an address lifts a lockout that came
// while it was checked (the gate let it in before), and keeps the
// failures: the next one locks the address again, for longer.
func TestSecretSuccessLiftsLockoutKeepsFailures(t *testing.T) {
	p := SecretLockout{Free: 3, Base: 30 * time.Second, Max: 10 * time.Minute, Forget: time.Hour, PrefixFree: 100, PrefixEvery: time.Second}
	s := newSecretLimit(p)
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	src := bridges.SourceOf(&net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 40000})
	for range 3 {
		s.failed(now, src)
	}
	if until, _ := s.gated(now, src, "devs"); !until.Equal(now.Add(30 * time.Second)) {
		t.Fatalf("after 3 failures: gated until %v, want 30 s", until)
	}
	s.succeeded(now, src, "devs")
	if until, _ := s.gated(now, src, "devs"); !until.IsZero() {
		t.Errorf("after a success: gated until %v, want not gated", until)
	}
	s.failed(now, src)
	if until, _ := s.gated(now, src, "devs"); !until.Equal(now.Add(time.Minute)) {
		t.Errorf("one failure after the success: gated until %v, want 1 min (the fourth failure's lockout)", until)
	}
}

// TestSecretLockoutPerSource: after Free failed secret logins from one
// address, logins from it are refused without a secret check (MQTT 5 0x9F
// connection rate exceeded, 3.1.1 0x03 server unavailable), counted as
// secret_lockout, until the lockout ends; another address is not affected.
func TestSecretLockoutPerSource(t *testing.T) {
	for _, tc := range []struct {
		ver        byte
		bad, gated byte
	}{{5, packets.ErrBadUsernameOrPassword.Code, packets.ErrConnectionRateExceeded.Code}, {4, packets.Err3NotAuthorized.Code, packets.Err3ServerUnavailable.Code}} {
		t.Run(fmt.Sprintf("v%d", tc.ver), func(t *testing.T) {
			var mu sync.Mutex
			now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
			clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
			var checks atomic.Int32
			r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true, Now: clock,
				SecretLockout: SecretLockout{Free: 3, Base: 30 * time.Second, Max: time.Minute, Forget: time.Hour}},
				func(ca *pki.CA) bridges.Identity { return countingIdentity{caIdentity{ca}, &checks} })
			login := func(from, secret string) byte { t.Helper(); return secretLogin(t, r, tc.ver, from, secret) }
			for i := range 3 {
				if got := login("127.0.0.1", "wrong"); got != tc.bad {
					t.Fatalf("wrong secret %d: CONNACK 0x%02x, want 0x%02x", i, got, tc.bad)
				}
			}
			if got := login("127.0.0.1", "s3cret"); got != tc.gated {
				t.Fatalf("right secret from the locked address: CONNACK 0x%02x, want 0x%02x", got, tc.gated)
			}
			if n := checks.Load(); n != 3 {
				t.Errorf("secret checks = %d, want 3: the locked-out login must not run argon2id", n)
			}
			if got := r.refusals(hub.ReasonSecretLockout); got != 1 {
				t.Errorf("secret_lockout refusals %v, want 1", got)
			}
			if got := r.refusals(hub.ReasonBadSecret); got != 3 {
				t.Errorf("bad_secret refusals %v, want 3", got)
			}
			// Another address of the same host is its own source.
			if got := login("127.0.0.2", "s3cret"); got != 0 {
				t.Fatalf("right secret from another address: CONNACK 0x%02x, want 0", got)
			}
			mu.Lock()
			now = now.Add(31 * time.Second)
			mu.Unlock()
			if got := login("127.0.0.1", "s3cret"); got != 0 {
				t.Fatalf("right secret after the lockout ended: CONNACK 0x%02x, want 0", got)
			}
		})
	}
}

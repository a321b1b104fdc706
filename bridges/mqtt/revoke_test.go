package mqtt

import (
	"errors"
	"fmt"
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

// slowIdentity is an identity whose credential check reads the revocation
// state first and then takes its time, as the gateway's does (argon2id
// after the store lookup): its stallAt-th check waits, after the read,
// until the test releases it.
type slowIdentity struct {
	caIdentity
	stallAt int32
	calls   atomic.Int32
	stalled chan chan struct{}

	mu      sync.Mutex
	revoked map[string]bool
	subs    []func(string)
}

func (i *slowIdentity) VerifyCert(raw [][]byte) (string, error) {
	dev, err := i.caIdentity.VerifyCert(raw)
	if err != nil {
		return dev, err
	}
	return dev, i.check(dev)
}

func (i *slowIdentity) CheckSecret(dev string, secret []byte) error {
	if string(secret) != "s3cret" {
		return errors.New("wrong secret")
	}
	return i.check(dev)
}

func (i *slowIdentity) check(dev string) error {
	i.mu.Lock()
	revoked := i.revoked[dev]
	i.mu.Unlock()
	if i.calls.Add(1) == i.stallAt {
		release := make(chan struct{})
		i.stalled <- release
		<-release
	}
	if revoked {
		return fmt.Errorf("device %s: %w", dev, pki.ErrRevoked)
	}
	return nil
}

func (i *slowIdentity) OnRevoke(f func(string)) {
	i.mu.Lock()
	i.subs = append(i.subs, f)
	i.mu.Unlock()
}

func (i *slowIdentity) revoke(dev string) {
	i.mu.Lock()
	i.revoked[dev] = true
	subs := append([]func(string){}, i.subs...)
	i.mu.Unlock()
	for _, f := range subs {
		f(dev)
	}
}

// TestRevokedWhileConnecting: a device revoked while its CONNECT's
// credential check is under way (after the check read the revocation
// state, before mochi added the client to its Clients) has its session
// closed within 1 s of the revocation, for a certificate and for a secret
// login alike, the refusal is counted as revoked, and its Will is not sent.
func TestRevokedWhileConnecting(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cert    bool
		stallAt int32 // the check of OnConnectAuthenticate
	}{
		{"certificate", true, 2}, // the 1st is the TLS handshake's
		{"secret", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := &slowIdentity{stallAt: tc.stallAt, stalled: make(chan chan struct{}), revoked: map[string]bool{}}
			r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true}, func(ca *pki.CA) bridges.Identity {
				id.caIdentity = caIdentity{ca}
				return id
			})
			before := r.refusals(hub.ReasonRevoked)
			d := r.dialTLS(t, "deva", 5, tc.cert)
			// With a Will, which a revoked device's session must not send.
			cp := packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "deva",
				WillFlag: true, WillTopic: "devices/deva/s/online", WillPayload: []byte("offline"), WillQos: 1, WillRetain: true}
			if !tc.cert {
				cp.Username, cp.UsernameFlag, cp.Password, cp.PasswordFlag = []byte("deva"), true, []byte("s3cret"), true
			}
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: cp})
			var release chan struct{}
			select {
			case release = <-id.stalled:
			case <-time.After(10 * time.Second):
				t.Fatal("the CONNECT's credential check never ran")
			}
			start := time.Now()
			id.revoke("deva")
			close(release)

			for {
				pk, err := d.readErr(time.Second - time.Since(start))
				if isTimeout(err) {
					t.Fatal("session of the device revoked while it connected still open 1 s after the revocation")
				}
				if err != nil {
					break // closed
				}
				if pk.FixedHeader.Type == packets.Connack && pk.ReasonCode >= 0x80 {
					break // refused at once: fine too
				}
			}
			waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
			if got := r.refusals(hub.ReasonRevoked) - before; got != 1 {
				t.Errorf("revoked refusals counted %v, want 1", got)
			}
			if q := r.queued(t); len(q) != 0 {
				t.Errorf("queue holds %q: the revoked device's Will was sent", q)
			}
			if _, ok := r.s.Retained("devices/deva/s/online"); ok {
				t.Error("the revoked device's Will is retained")
			}
		})
	}
}

// TestRevokedSessionSendsNoWill: closing the session of a device revoked
// while connected ends its connection with an error, after which mochi
// would send its Will; nothing is taken from a revoked device, so the Will
// is neither queued nor retained nor delivered.
func TestRevokedSessionSendsNoWill(t *testing.T) {
	id := &slowIdentity{revoked: map[string]bool{}}
	r := newRigWith(t, queue.Options{}, Config{}, func(ca *pki.CA) bridges.Identity {
		id.caIdentity = caIdentity{ca}
		return id
	})
	sub := r.inlineSub(t, "devices/deva/s/#")
	d := r.dialTLS(t, "deva", 5, true)
	if pk := d.connectWill(packets.ConnectParams{WillTopic: "devices/deva/s/online", WillPayload: []byte("offline"), WillQos: 1, WillRetain: true}); pk.ReasonCode != 0 {
		t.Fatalf("CONNACK %#x", pk.ReasonCode)
	}
	waitFor(t, "the session", func() bool { return r.s.SessionCount() == 1 })
	id.revoke("deva")
	d.closed()
	// The session leaves the gauge only after mochi's sendLWT returned.
	waitFor(t, "the session to end", func() bool { return r.s.SessionCount() == 0 })
	if q := r.queued(t); len(q) != 0 {
		t.Errorf("queue holds %q: the revoked device's Will was sent", q)
	}
	if _, ok := r.s.Retained("devices/deva/s/online"); ok {
		t.Error("the revoked device's Will is retained")
	}
	select {
	case m := <-sub:
		t.Errorf("subscriber got %q", m)
	default:
	}
}

// busyIdentity is an identity whose secret checks are all refused as busy
// (the gateway's bound on concurrent argon2id checks).
type busyIdentity struct{ caIdentity }

func (busyIdentity) CheckSecret(string, []byte) error {
	return fmt.Errorf("too many at once: %w", bridges.ErrBusy)
}

// TestSecretCheckBusyIsServerBusy: a secret login the identity did not
// check (too many checks at once) is refused as "server busy" (MQTT 5
// 0x89; 3.1.1 0x03 server unavailable), which a device retries, not as a
// bad user name or password, and counted as busy, not bad_secret.
func TestSecretCheckBusyIsServerBusy(t *testing.T) {
	for _, tc := range []struct {
		ver  byte
		want byte
	}{{5, packets.ErrServerBusy.Code}, {4, packets.Err3ServerUnavailable.Code}} {
		t.Run(fmt.Sprintf("v%d", tc.ver), func(t *testing.T) {
			r := newRigWith(t, queue.Options{}, Config{AllowSecretAuth: true}, func(ca *pki.CA) bridges.Identity {
				return busyIdentity{caIdentity{ca}}
			})
			d := r.dialTLS(t, "devb", tc.ver, false)
			cp := packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "devb",
				Username: []byte("devb"), UsernameFlag: true, Password: []byte("s3cret"), PasswordFlag: true}
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: cp})
			pk := d.read(10 * time.Second)
			if pk.FixedHeader.Type != packets.Connack || pk.ReasonCode != tc.want {
				t.Fatalf("got packet type %d reason 0x%02x, want CONNACK 0x%02x", pk.FixedHeader.Type, pk.ReasonCode, tc.want)
			}
			if got := r.refusals(hub.ReasonBusy); got != 1 {
				t.Errorf("busy refusals %v, want 1", got)
			}
			if got := r.refusals(hub.ReasonBadSecret); got != 0 {
				t.Errorf("bad_secret refusals %v, want 0", got)
			}
		})
	}
}

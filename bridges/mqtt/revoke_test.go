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
// login alike, and the refusal is counted as revoked.
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
			cp := packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: "deva"}
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
		})
	}
}

package mosquitto_test

import (
	"crypto/tls"
	"testing"

	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
)

// TestStartStopStart proves the helper: handshake with a CA-issued client
// certificate works, a certificate from another CA is refused, and the broker
// comes back on the same port after Stop.
func TestStartStopStart(t *testing.T) {
	b := mosquitto.Start(t, mosquitto.Options{})
	handshake := func(c *tls.Config) error {
		conn, err := tls.Dial("tcp", b.Addr, c)
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3: the server's verdict on the client certificate arrives
		// after the client's handshake finishes; a read surfaces it.
		_ = conn.SetReadDeadline(timeNowPlus())
		var one [1]byte
		_, err = conn.Read(one[:])
		if isTimeout(err) {
			return nil
		}
		return err
	}
	good := b.CA.Client(t, "good")
	if err := handshake(b.ClientTLS(good)); err != nil {
		t.Fatalf("handshake with a valid client certificate: %v", err)
	}
	other := testpki.New(t, t.TempDir(), "other")
	bad := other.Client(t, "bad")
	if err := handshake(b.ClientTLS(bad)); err == nil {
		t.Fatalf("handshake with a certificate from another CA succeeded; want refusal")
	}
	port := b.Port
	b.Stop(t)
	if _, err := tls.Dial("tcp", b.Addr, b.ClientTLS(good)); err == nil {
		t.Fatalf("dial after Stop succeeded")
	}
	b.Start(t)
	if b.Port != port {
		t.Fatalf("port changed across restart: %d -> %d", port, b.Port)
	}
	if err := handshake(b.ClientTLS(good)); err != nil {
		t.Fatalf("handshake after restart: %v", err)
	}
}

package mosquitto_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/child"
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

// TestTLSVersion12Only proves the TLSVersion "1.2" option: the broker
// refuses a client that offers only TLS 1.3 and negotiates TLS 1.2 with one
// that offers both (as ClientTLS does for it), so a test against it shows
// what a TLS-1.2-only cloud broker does. The default broker negotiates 1.3.
func TestTLSVersion12Only(t *testing.T) {
	for _, tc := range []struct {
		version string
		want    uint16
	}{{"1.2", tls.VersionTLS12}, {"", tls.VersionTLS13}} {
		b := mosquitto.Start(t, mosquitto.Options{TLSVersion: tc.version, Name: "tls" + tc.version})
		leaf := b.CA.Client(t, "client")
		conn, err := tls.Dial("tcp", b.Addr, b.ClientTLS(leaf))
		if err != nil {
			t.Fatalf("TLSVersion %q: handshake with ClientTLS: %v", tc.version, err)
		}
		if v := conn.ConnectionState().Version; v != tc.want {
			t.Errorf("TLSVersion %q: negotiated %s, want %s", tc.version, tls.VersionName(v), tls.VersionName(tc.want))
		}
		conn.Close()
		if tc.version != "1.2" {
			continue
		}
		only13 := b.ClientTLS(leaf)
		only13.MinVersion = tls.VersionTLS13
		if conn, err := tls.Dial("tcp", b.Addr, only13); err == nil {
			conn.Close()
			t.Errorf("TLSVersion 1.2: a TLS 1.3-only client completed the handshake")
		} else {
			t.Logf("TLS 1.3-only client refused as expected: %v", err)
		}
	}
}

// TestBrokerEndsWithTestBinary: a test binary killed before its cleanups
// run (a -timeout panic, SIGKILL) leaves no mosquitto behind.
func TestBrokerEndsWithTestBinary(t *testing.T) {
	const helperEnv = "BASTION_MOSQUITTO_HELPER"
	if os.Getenv(helperEnv) == "1" {
		b := mosquitto.Start(t, mosquitto.Options{})
		fmt.Println(b.Pid())
		// Killed here by the test; stdin never ends before that.
		bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(1)
	}
	testenv.RequireCommand(t, "mosquitto")
	child.CheckEndsWithParent(t, func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestBrokerEndsWithTestBinary$", "-test.count=1")
		// The killed test's temporary files (the broker's directory) go
		// with this test's.
		cmd.Env = append(os.Environ(), helperEnv+"=1", "TMPDIR="+t.TempDir())
		return cmd
	})
}

package gateway

// The DTLS profile of both CoAPS listeners (pki/profile.go), checked from
// the outside with a real pion client on loopback: weakening it (extended
// master secret optional, another suite, cookies off) fails this test.
// The expected suites are written here, not read from pki, so a change of
// the lists there must be made here too, on purpose.

import (
	"context"
	"net"
	"slices"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
)

// profileSuites are the suites each listener must accept, and nothing else.
var profileSuites = map[string][]piondtls.CipherSuiteID{
	"cert": {piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
	"psk":  {piondtls.TLS_PSK_WITH_AES_128_CCM_8, piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256},
}

// candidateSuites are the suites pion's client can offer with each kind of
// credentials: every one of them is tried alone.
var candidateSuites = map[string][]piondtls.CipherSuiteID{
	"cert": {
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA,
		piondtls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
		piondtls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	},
	"psk": {
		piondtls.TLS_PSK_WITH_AES_128_CCM,
		piondtls.TLS_PSK_WITH_AES_128_CCM_8,
		piondtls.TLS_PSK_WITH_AES_256_CCM_8,
		piondtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
		piondtls.TLS_PSK_WITH_CHACHA20_POLY1305_SHA256,
		piondtls.TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256,
	},
}

// profileHandshake runs a client handshake with cfg against addr; the
// connection is closed at the end of the test. A config pion's client
// refuses is the test's mistake, not a refusal by the gateway.
func profileHandshake(t *testing.T, addr string, cfg *piondtls.Config) (*piondtls.Conn, error) {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := piondtls.Dial("udp", raddr, cfg)
	if err != nil {
		t.Fatalf("pion client config: %v", err)
	}
	t.Cleanup(func() { dc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return dc, nil
}

// firstFlight is the first datagram a pion client with cfg sends.
func firstFlight(t *testing.T, cfg *piondtls.Config) []byte {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c, err := piondtls.Dial("udp", pc.LocalAddr().(*net.UDPAddr), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.HandshakeContext(ctx); close(done) }()
	buf := make([]byte, 2048)
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := pc.ReadFrom(buf)
	cancel()
	c.Close()
	<-done
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func TestDTLSProfile(t *testing.T) {
	g := startTransports(t)
	for _, kind := range []string{"cert", "psk"} {
		t.Run(kind, func(t *testing.T) {
			d := g.addDevice(t, "profile-"+kind, kind)
			addr := g.coapAddr(d)
			base := func() *piondtls.Config {
				cfg, err := d.DTLSConfig(addr)
				if err != nil {
					t.Fatal(err)
				}
				return cfg
			}
			want := profileSuites[kind]

			// The device's own config works: what fails below fails for
			// the one thing changed.
			if _, err := profileHandshake(t, addr, base()); err != nil {
				t.Fatalf("handshake with the device's config: %v", err)
			}

			// Extended master secret (RFC 7627) is required.
			noEMS := base()
			noEMS.ExtendedMasterSecret = piondtls.DisableExtendedMasterSecret
			if _, err := profileHandshake(t, addr, noEMS); err == nil {
				t.Error("handshake without extended master secret accepted")
			}

			// Each suite alone: accepted exactly when it is in the list.
			for _, s := range candidateSuites[kind] {
				one := base()
				one.CipherSuites = []piondtls.CipherSuiteID{s}
				_, err := profileHandshake(t, addr, one)
				switch in := slices.Contains(want, s); {
				case in && err != nil:
					t.Errorf("%v refused: %v", s, err)
				case !in && err == nil:
					t.Errorf("%v accepted, not in the profile %v", s, want)
				}
			}

			// A client offering everything it has gets a suite of the
			// list; so does pion's default client (nil CipherSuites: its
			// default list, certificate suites only, which a PSK client
			// cannot use).
			offers := [][]piondtls.CipherSuiteID{candidateSuites[kind]}
			if kind == "cert" {
				offers = append(offers, nil)
			}
			for _, offer := range offers {
				cfg := base()
				cfg.CipherSuites = offer
				dc, err := profileHandshake(t, addr, cfg)
				if err != nil {
					t.Errorf("handshake offering %v: %v", offer, err)
					continue
				}
				st, ok := dc.ConnectionState()
				if !ok || !slices.Contains(want, st.CipherSuiteID) {
					t.Errorf("offering %v negotiated %v, want one of %v", offer, st.CipherSuiteID, want)
				}
			}

			// A ClientHello without a cookie is answered with a
			// HelloVerifyRequest (handshake type 3), not a ServerHello.
			c := sendHellos(t, addr, firstFlight(t, base()), 1)[0]
			if cookie := helloVerifyCookie(t, c); len(cookie) == 0 {
				t.Error("HelloVerifyRequest with an empty cookie")
			}
		})
	}
}

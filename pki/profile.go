package pki

import (
	"crypto/tls"
	"crypto/x509"

	"github.com/pion/dtls/v3"
	"github.com/pion/logging"
)

// The one place TLS and DTLS settings are chosen.
//
// TCP listeners follow Mozilla's "intermediate" server profile: TLS 1.2 and
// 1.3, ECDHE with AEAD ciphers only, X25519/P-256/P-384 (plus the hybrid
// post-quantum X25519MLKEM768 first, which Mozilla's current guidelines
// add). Our server keys are ECDSA, so only the ECDSA suites can be chosen.
var tlsCipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,
}

var tlsCurves = []tls.CurveID{tls.X25519MLKEM768, tls.X25519, tls.CurveP256, tls.CurveP384}

// TLSServer returns the server config for a TCP listener. clientAuth is
// tls.RequireAnyClientCert (with verify checking the device) for device
// listeners, or tls.NoClientCert for the console.
func TLSServer(sc *ServerCert, clientAuth tls.ClientAuthType, verify func(rawCerts [][]byte, _ [][]*x509.Certificate) error) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS12,
		CipherSuites:          tlsCipherSuites,
		CurvePreferences:      tlsCurves,
		GetCertificate:        sc.GetCertificate,
		ClientAuth:            clientAuth,
		VerifyPeerCertificate: verify,
	}
}

// Outbound connections also meet servers with RSA keys (cloud brokers,
// CDNs), so clients offer the ECDHE_RSA AEAD suites too: together the
// intermediate profile's TLS 1.2 suites. Never a CBC or RSA key exchange
// suite, which crypto/tls would offer by default.
var tlsClientCipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,
}

// TLSClient returns the client config for outbound connections (the
// upstream link, the vendor's firmware server): TLS 1.3 unless min12
// allows 1.2, ECDHE with AEAD suites only, the listeners' curves, the given
// roots (nil: the system's). net/http fills in an empty serverName with
// the dialled host; a caller of tls.Client must.
func TLSClient(roots *x509.CertPool, serverName string, min12 bool) *tls.Config {
	c := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		CipherSuites:     tlsClientCipherSuites,
		CurvePreferences: tlsCurves,
		RootCAs:          roots,
		ServerName:       serverName,
	}
	if min12 {
		c.MinVersion = tls.VersionTLS12
	}
	return c
}

// DTLS suites: CCM_8 for the smallest devices, GCM where they can.
var (
	DTLSCertSuites = []dtls.CipherSuiteID{
		dtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
		dtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	}
	DTLSPSKSuites = []dtls.CipherSuiteID{
		dtls.TLS_PSK_WITH_AES_128_CCM_8,
		dtls.TLS_PSK_WITH_AES_128_GCM_SHA256,
	}
)

// DTLSCertServer returns the DTLS 1.2 server options for certificate
// devices: ECDSA suites, client certificate required and verified by
// verify, extended master secret required, HelloVerifyRequest cookies on,
// and connection IDs offered. Options, not a *dtls.Config, so a caller can
// add socket options (dtls.WithListenConfig) the Config cannot carry.
func DTLSCertServer(sc *ServerCert, verify func(rawCerts [][]byte, _ [][]*x509.Certificate) error) []dtls.ServerOption {
	return []dtls.ServerOption{
		dtls.WithCipherSuites(DTLSCertSuites...),
		dtls.WithGetCertificate(func(*dtls.ClientHelloInfo) (*tls.Certificate, error) {
			return sc.GetCertificate(nil)
		}),
		dtls.WithClientAuth(dtls.RequireAnyClientCert),
		dtls.WithVerifyPeerCertificate(verify),
		dtls.WithExtendedMasterSecret(dtls.RequireExtendedMasterSecret),
		dtls.WithConnectionIDGenerator(dtls.RandomCIDGenerator(8)),
		dtls.WithLoggerFactory(newSharedDTLSLogs()),
	}
}

// DTLSPSKServer returns the DTLS 1.2 server options for PSK devices. psk
// maps the identity the device sends to its key, or an error for an unknown
// or revoked identity.
func DTLSPSKServer(psk func(identity []byte) ([]byte, error)) []dtls.ServerOption {
	return []dtls.ServerOption{
		dtls.WithCipherSuites(DTLSPSKSuites...),
		dtls.WithPSK(psk),
		dtls.WithPSKIdentityHint([]byte("bastion")),
		dtls.WithExtendedMasterSecret(dtls.RequireExtendedMasterSecret),
		dtls.WithConnectionIDGenerator(dtls.RandomCIDGenerator(8)),
		dtls.WithLoggerFactory(newSharedDTLSLogs()),
	}
}

// sharedDTLSLogs hands every connection of a listener the same pion logger,
// with pion's default level and output. pion's default factory builds five
// log.Loggers per connection, about 1 KiB of every idle DTLS session.
type sharedDTLSLogs struct{ l *dtlsLogger }

func newSharedDTLSLogs() sharedDTLSLogs {
	f := logging.NewDefaultLoggerFactory()
	level := f.DefaultLogLevel
	if l, ok := f.ScopeLevels["dtls"]; ok {
		level = l
	}
	return sharedDTLSLogs{&dtlsLogger{LeveledLogger: f.NewLogger("dtls"), trace: level >= logging.LogLevelTrace}}
}

func (s sharedDTLSLogs) NewLogger(string) logging.LeveledLogger { return s.l }

// dtlsLogger tells the patched pion whether it writes Tracef lines
// (third_party/README.md): when it does not (unless PION_LOG_TRACE names
// dtls or all), pion skips the Tracef calls of its handshake, whose
// arguments are allocated even when the line is dropped.
type dtlsLogger struct {
	logging.LeveledLogger
	trace bool
}

// TraceEnabled reports whether Tracef writes anything.
func (l *dtlsLogger) TraceEnabled() bool { return l.trace }

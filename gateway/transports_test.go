package gateway

// End-to-end tests of the device transports (bridges/coap, bridges/mqtt,
// bridges/hub) in a real dev gateway on loopback, with real peers: libcoap's
// coap-client-openssl, mosquitto_pub/mosquitto_sub, pion/dtls and the
// devicesim library.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/internal/testutil/testpki"
	"github.com/bastion-iot/bastion/pki"
)

// testSink is a Sink whose behaviour a test controls.
type testSink struct {
	full  atomic.Bool
	block chan chan struct{} // non-nil: Accept announces itself and waits
	mu    sync.Mutex
	got   []bridges.Message
}

func (s *testSink) Accept(ctx context.Context, m bridges.Message) error {
	if s.full.Load() {
		return bridges.ErrQueueFull
	}
	if s.block != nil {
		release := make(chan struct{})
		select {
		case s.block <- release:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.mu.Lock()
	s.got = append(s.got, m)
	s.mu.Unlock()
	return nil
}

func (s *testSink) messages() []bridges.Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]bridges.Message(nil), s.got...)
}

type tgw struct {
	*running
	log   *logbuf.Buffer
	dir   string
	sink  *testSink
	clock *testpki.OffsetClock
}

// startTransports starts a dev gateway on free loopback ports with a test
// sink, a settable clock and a captured log.
func startTransports(t *testing.T) *tgw { return startTransportsWith(t, false) }

func startTransportsWith(t *testing.T, secretAuth bool) *tgw {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(dir, 0o700)
	cfg := testConfig(dir)
	cfg.CoAP.MaxPayload = 1024
	cfg.MQTT.AllowSecretAuth = secretAuth
	if err := WriteConfigFile(filepath.Join(dir, "bastion.yaml"), cfg); err != nil {
		t.Fatal(err)
	}
	lb := &logbuf.Buffer{}
	sink := &testSink{}
	clock := &testpki.OffsetClock{}
	r := runGateway(t, Options{Dev: true, StateDir: dir, Log: slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Out: &bytes.Buffer{}, Sink: sink, Clock: clock}, 10*time.Second)
	tg := &tgw{running: r, log: lb, dir: dir, sink: sink, clock: clock}
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("gateway log:\n%s", lb.String())
		}
	})
	return tg
}

// addDevice adds a device with the given auth and returns devicesim
// credentials (with the key, for certificate devices).
func (g *tgw) addDevice(t *testing.T, name, auth string) *devicesim.Device {
	t.Helper()
	req := AddRequest{Name: name, Auth: auth}
	var keyPEM []byte
	if auth == "cert" {
		var csr []byte
		var err error
		keyPEM, csr, err = devicesim.NewKey()
		if err != nil {
			t.Fatal(err)
		}
		req.CSR = string(csr)
	}
	c, err := g.g.Devices().Add(req, Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	d := &devicesim.Device{Creds: devicesim.Creds{ID: c.ID, Name: c.Name, Auth: c.Auth, PSKIdentity: c.PSKIdentity,
		PSK: c.PSK, CoAPSPort: c.CoAPSPort, CertPEM: c.CertPEM, CAPEM: c.CAPEM, Secret: c.Secret, KeyPEM: string(keyPEM)}}
	if d.CAPEM == "" {
		d.CAPEM = string(pki.CertPEM(g.g.CA().Root()))
	}
	return d
}

func (g *tgw) coapAddr(d *devicesim.Device) string {
	if d.Auth == "psk" {
		return g.g.Addrs()["coaps_psk"]
	}
	return g.g.Addrs()["coaps"]
}

func (g *tgw) refusals(transport, reason string) float64 {
	return testutil.ToFloat64(g.g.Hub().Metrics().Refused.WithLabelValues(transport, reason))
}

// waitLog waits (bounded) for a log line containing every part.
func (g *tgw) waitLog(t *testing.T, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, line := range strings.Split(g.log.String(), "\n") {
			ok := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					ok = false
					break
				}
			}
			if ok {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q in:\n%s", parts, g.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// subscribeLocal collects what is published on filter inside the broker.
func (g *tgw) subscribeLocal(t *testing.T, filter string) <-chan [2]string {
	ch := make(chan [2]string, 100)
	cancel, err := g.g.mqtt.Subscribe(filter, func(topic string, payload []byte) {
		select {
		case ch <- [2]string{topic, string(payload)}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	return ch
}

func expectMsg(t *testing.T, ch <-chan [2]string, topic, payload string) {
	t.Helper()
	select {
	case got := <-ch:
		if got != [2]string{topic, payload} {
			t.Fatalf("got %q, want %q on %q", got, payload, topic)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("nothing on %s within 5s", topic)
	}
}

// libcoapClients are libcoap's DTLS clients in Debian's libcoap3-bin: two
// DTLS stacks (OpenSSL and GnuTLS) that devices' own stacks resemble, each
// with its own way through the HelloVerifyRequest (pion-dtls patch (51)).
var libcoapClients = []string{"coap-client-openssl", "coap-client-gnutls"}

// eachLibcoapClient runs f as a subtest for each of libcoapClients.
func eachLibcoapClient(t *testing.T, f func(t *testing.T, cc string)) {
	for _, name := range libcoapClients {
		t.Run(name, func(t *testing.T) { f(t, testenv.RequireCommand(t, name)) })
	}
}

func TestLibcoapPSKTelemetryReachesMQTT(t *testing.T) { eachLibcoapClient(t, libcoapPSKTelemetry) }

func libcoapPSKTelemetry(t *testing.T, cc string) {
	g := startTransports(t)
	d := g.addDevice(t, "lamp", "psk")
	local := g.subscribeLocal(t, "devices/+/t/#")
	key, _ := hex.DecodeString(d.PSK)
	u := "coaps://" + g.g.Addrs()["coaps_psk"] + "/t/room/temp"
	out, err := exec.CommandContext(ctxT(t, 20*time.Second), cc, "-u", d.PSKIdentity, "-k", string(key),
		"-m", "post", "-e", "21.5", "-B", "10", u).CombinedOutput()
	if err != nil {
		t.Fatalf("coap-client POST: %v\n%s", err, out)
	}
	expectMsg(t, local, "devices/"+d.ID+"/t/room/temp", "21.5")
	msgs := g.sink.messages()
	if len(msgs) != 1 || msgs[0].Device != d.ID || msgs[0].QoS != 1 || msgs[0].Topic != "devices/"+d.ID+"/t/room/temp" {
		t.Errorf("sink got %+v, want one QoS 1 message from %s", msgs, d.ID)
	}
	// /.well-known/core answers with the link format.
	out, err = exec.CommandContext(ctxT(t, 20*time.Second), cc, "-u", d.PSKIdentity, "-k", string(key),
		"-m", "get", "-B", "10", "coaps://"+g.g.Addrs()["coaps_psk"]+"/.well-known/core").CombinedOutput()
	if err != nil || !strings.Contains(string(out), `</t>;rt="bastion.telemetry"`) {
		t.Errorf("/.well-known/core: %v\n%s", err, out)
	}
}

func TestLibcoapCertTelemetryAndRefusals(t *testing.T) { eachLibcoapClient(t, libcoapCertTelemetry) }

func libcoapCertTelemetry(t *testing.T, cc string) {
	g := startTransports(t)
	d := g.addDevice(t, "meter", "cert")
	local := g.subscribeLocal(t, "devices/+/t/#")
	tmp := t.TempDir()
	certF := writeFile(t, tmp, "c.pem", d.CertPEM)
	keyF := writeFile(t, tmp, "k.pem", d.KeyPEM)
	caF := writeFile(t, tmp, "ca.pem", d.CAPEM)
	run := func(cert, key string, path string, payload string) ([]byte, error) {
		u := "coaps://" + g.g.Addrs()["coaps"] + path
		return exec.CommandContext(ctxT(t, 20*time.Second), cc, "-c", cert, "-j", key, "-C", caF,
			"-m", "post", "-e", payload, "-B", "5", u).CombinedOutput()
	}
	if out, err := run(certF, keyF, "/t/energy", "42"); err != nil {
		t.Fatalf("coap-client with certificate: %v\n%s", err, out)
	}
	expectMsg(t, local, "devices/"+d.ID+"/t/energy", "42")

	// Oversized payload: 4.13 with a log line and a metric.
	before := g.refusals(hub.CoAP, hub.ReasonTooLarge)
	out, _ := run(certF, keyF, "/t/big", strings.Repeat("x", 1500))
	if !strings.Contains(string(out), "4.13") {
		t.Errorf("oversized POST: want 4.13, got\n%s", out)
	}
	g.waitLog(t, "payload too large", "device="+d.ID)
	if g.refusals(hub.CoAP, hub.ReasonTooLarge) != before+1 {
		t.Error("oversized payload not counted")
	}

	// A certificate from another CA: refused in the handshake.
	otherCert, otherKey := foreignDeviceCert(t, d.ID, time.Hour)
	before = g.refusals(hub.CoAP, hub.ReasonWrongCA)
	if out, err := run(writeFile(t, tmp, "oc.pem", otherCert), writeFile(t, tmp, "ok.pem", otherKey), "/t/x", "1"); err == nil && !strings.Contains(string(out), "error") {
		t.Logf("coap-client output with a foreign certificate:\n%s", out)
	}
	g.waitLog(t, "device certificate not accepted", "device="+d.ID, "reason=wrong_ca")
	if g.refusals(hub.CoAP, hub.ReasonWrongCA) < before+1 {
		t.Error("wrong CA not counted")
	}
}

// foreignDeviceCert is a device certificate for id from a CA the gateway
// does not know.
func foreignDeviceCert(t *testing.T, id string, validity time.Duration) (certPEM, keyPEM string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caT := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "evil CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(validity)}
	caDER, _ := x509.CreateCertificate(rand.Reader, caT, caT, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(pki.DeviceURIPrefix + id)
	lt := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: id}, URIs: []*url.URL{u},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(validity)}
	der, err := x509.CreateCertificate(rand.Reader, lt, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
}

// TestPlaintextCoAPOnDTLSPortsRefused sends libcoap's plain coap:// to both
// DTLS ports: each datagram is refused with a log line naming what it was
// and counted, nothing answers it, and DTLS on the same ports still works.
func TestPlaintextCoAPOnDTLSPortsRefused(t *testing.T) {
	cc := testenv.RequireCommand(t, "coap-client-openssl")
	g := startTransports(t)
	d := g.addDevice(t, "kettle", "psk")
	for _, port := range []string{"coaps", "coaps_psk"} {
		before := g.refusals(hub.CoAP, hub.ReasonPlaintext)
		u := "coap://" + g.g.Addrs()[port] + "/t/plain"
		out, err := exec.CommandContext(ctxT(t, 20*time.Second), cc, "-m", "post", "-e", "1", "-B", "2", u).CombinedOutput()
		if err == nil && strings.Contains(string(out), "2.0") {
			t.Errorf("%s: plaintext POST was answered:\n%s", port, out)
		}
		g.waitLog(t, "plaintext on a DTLS port", `saw="plaintext CoAP"`, "listen="+g.g.Addrs()[port])
		if got := g.refusals(hub.CoAP, hub.ReasonPlaintext); got <= before {
			t.Errorf("%s: plaintext datagrams not counted (refusals %v → %v)", port, before, got)
		}
	}
	// Raw garbage too, and DTLS on the PSK port is unaffected.
	before := g.refusals(hub.CoAP, hub.ReasonPlaintext)
	c, err := net.Dial("udp", g.g.Addrs()["coaps_psk"])
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0xde, 0xad, 0xbe, 0xef, 0x00})
	c.Close()
	g.waitLog(t, "plaintext on a DTLS port", `saw="not DTLS"`, "listen="+g.g.Addrs()["coaps_psk"])
	if g.refusals(hub.CoAP, hub.ReasonPlaintext) != before+1 {
		t.Error("non-DTLS datagram not counted once")
	}
	co, err := d.DialCoAP(ctxT(t, 10*time.Second), g.coapAddr(d))
	if err != nil {
		t.Fatalf("DTLS next to the guard: %v", err)
	}
	co.Close()
}

func TestMosquittoClientsWithCertificates(t *testing.T) {
	pub := testenv.RequireCommand(t, "mosquitto_pub")
	sub := testenv.RequireCommand(t, "mosquitto_sub")
	g := startTransports(t)
	d := g.addDevice(t, "thermo", "cert")
	local := g.subscribeLocal(t, "devices/+/t/#")
	tmp := t.TempDir()
	host, port, _ := net.SplitHostPort(g.g.Addrs()["mqtts"])
	args := []string{"-h", host, "-p", port, "--cafile", writeFile(t, tmp, "ca.pem", d.CAPEM),
		"--cert", writeFile(t, tmp, "c.pem", d.CertPEM), "--key", writeFile(t, tmp, "k.pem", d.KeyPEM), "-i", d.ID}
	out, err := exec.CommandContext(ctxT(t, 20*time.Second), pub, append(args, "-q", "1", "-V", "mqttv311", "-t", "devices/"+d.ID+"/t/temp", "-m", "19.0")...).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_pub: %v\n%s", err, out)
	}
	expectMsg(t, local, "devices/"+d.ID+"/t/temp", "19.0")

	// A command delivered by the gateway reaches mosquitto_sub.
	ctx := ctxT(t, 20*time.Second)
	cmd := exec.CommandContext(ctx, sub, append(args, "-V", "mqttv5", "-q", "1", "-C", "1", "-W", "15", "-t", "devices/"+d.ID+"/c/#", "-v")...)
	var so bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &so
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for waiting := true; waiting; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("mosquitto_sub: %v\n%s", err, so.String())
			}
			waiting = false
		case <-tick.C: // until the subscription is in place
			if err := g.g.Deliver(ctx, bridges.Message{Device: d.ID, Topic: "devices/" + d.ID + "/c/led", Payload: []byte("on"), QoS: 1}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := strings.TrimSpace(so.String()); got != "devices/"+d.ID+"/c/led on" {
		t.Errorf("mosquitto_sub got %q", got)
	}

	// Plaintext MQTT on the TLS port: refused, logged, counted.
	before := g.refusals(hub.MQTT, hub.ReasonPlaintext)
	c, err := net.Dial("tcp", g.g.Addrs()["mqtts"])
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0x10, 0x10, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, 't', 'e', 's', 't'})
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := c.Read(make([]byte, 64)); n > 5 {
		t.Errorf("gateway answered plaintext with %d bytes", n)
	}
	c.Close()
	g.waitLog(t, "plaintext on the TLS port", "saw=\"plaintext MQTT CONNECT\"")
	if g.refusals(hub.MQTT, hub.ReasonPlaintext) != before+1 {
		t.Error("plaintext attempt not counted")
	}
}

func TestCommandReachesCoAPObserverAndMQTTSubscriber(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	cd := g.addDevice(t, "valve", "psk")
	md := g.addDevice(t, "pump", "cert")
	co, err := cd.DialCoAP(ctx, g.coapAddr(cd))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	got := make(chan string, 10)
	cancel, err := co.Observe(ctx, "valve", func(p []byte) { got <- string(p) })
	if err != nil {
		t.Fatal(err)
	}
	mGot := make(chan [2]string, 10)
	mq, err := md.DialMQTT(ctx, g.g.Addrs()["mqtts"], func(topic string, p []byte) { mGot <- [2]string{topic, string(p)} })
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()
	if rc, err := mq.Subscribe(ctx, "devices/"+md.ID+"/c/#"); err != nil || rc > 1 {
		t.Fatalf("subscribe own commands: rc %#x, %v", rc, err)
	}
	if err := g.g.Deliver(ctx, bridges.Message{Device: cd.ID, Topic: "devices/" + cd.ID + "/c/valve", Payload: []byte("open")}); err != nil {
		t.Fatal(err)
	}
	if err := g.g.Deliver(ctx, bridges.Message{Device: md.ID, Topic: "devices/" + md.ID + "/c/speed", Payload: []byte("3")}); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if p != "open" {
			t.Errorf("CoAP observer got %q, want open", p)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("CoAP observer got no command")
	}
	expectMsg(t, mGot, "devices/"+md.ID+"/c/speed", "3")
	if st, _ := json.Marshal(g.g.Status().Components["transports"]); string(st) != `{"coap_sessions":1,"mqtt_sessions":1}` {
		t.Errorf("status transports = %s, want one session on each", st)
	}
	// A command for another device reaches neither.
	g.g.Deliver(ctx, bridges.Message{Device: "dother", Topic: "devices/dother/c/valve", Payload: []byte("x")})
	if err := g.g.Deliver(ctx, bridges.Message{Device: cd.ID, Topic: "devices/" + md.ID + "/c/x"}); err == nil {
		t.Error("Deliver accepted a topic outside the device's namespace")
	}
	if err := cancel(ctx); err != nil {
		t.Errorf("observe cancel: %v", err)
	}

	// Telemetry over devicesim CoAP and MQTT, into the sink.
	if r, err := co.Publish(ctx, "flow", []byte("7")); err != nil || r.Code != codes.Changed {
		t.Fatalf("CoAP publish: %v %v", r.Code, err)
	}
	if rc, err := mq.Publish(ctx, mq.TelemetryTopic("rpm"), 1, []byte("900")); err != nil || rc != 0 {
		t.Fatalf("MQTT publish: rc %#x %v", rc, err)
	}
	var topics []string
	for _, m := range g.sink.messages() {
		topics = append(topics, m.Topic)
	}
	want := []string{"devices/" + cd.ID + "/t/flow", "devices/" + md.ID + "/t/rpm"}
	if strings.Join(topics, ",") != strings.Join(want, ",") {
		t.Errorf("sink topics (-want +got):\n- %v\n+ %v", want, topics)
	}
}

func TestWrongRequestsGetTheRight4xx(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "probe", "psk")
	co, err := d.DialCoAP(ctx, g.coapAddr(d))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	for _, tc := range []struct {
		name string
		code codes.Code
		path string
		body []byte
		want codes.Code
	}{
		{"GET on telemetry", codes.GET, "/t/x", nil, codes.MethodNotAllowed},
		{"PUT on commands", codes.PUT, "/c/x", []byte("1"), codes.MethodNotAllowed},
		{"POST without path", codes.POST, "/t", []byte("1"), codes.BadRequest},
		{"unknown resource", codes.GET, "/nope", nil, codes.NotFound},
		{"DELETE on well-known", codes.DELETE, "/.well-known/core", nil, codes.MethodNotAllowed},
		{"oversized", codes.POST, "/t/x", bytes.Repeat([]byte("a"), 1025), codes.RequestEntityTooLarge},
		{"exactly the limit", codes.POST, "/t/x", bytes.Repeat([]byte("a"), 1024), codes.Changed},
	} {
		r, err := co.Do(ctx, tc.code, tc.path, tc.body, -1)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if r.Code != tc.want {
			t.Errorf("%s: got %v, want %v (%s)", tc.name, r.Code, tc.want, r.Payload)
		}
	}
	// Unsupported content format on telemetry: 4.15.
	r, err := co.Do(ctx, codes.POST, "/t/x", []byte("<a/>"), 41)
	if err != nil || r.Code != codes.UnsupportedMediaType {
		t.Errorf("XML telemetry: got %v %v, want 4.15", r.Code, err)
	}

	// Queue full: 5.03 with Max-Age on CoAP, PUBACK 0x97 on MQTT 5.
	g.sink.full.Store(true)
	r, err = co.Publish(ctx, "x", []byte("1"))
	if err != nil || r.Code != codes.ServiceUnavailable || r.MaxAge == 0 {
		t.Errorf("queue full over CoAP: got %v max-age %d (%v), want 5.03 with Max-Age", r.Code, r.MaxAge, err)
	}
	md := g.addDevice(t, "probe2", "cert")
	mq, err := md.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()
	if rc, _ := mq.Publish(ctx, mq.TelemetryTopic("x"), 1, []byte("1")); rc != 0x97 {
		t.Errorf("queue full over MQTT: PUBACK reason %#x, want 0x97", rc)
	}
	if n := g.refusals(hub.CoAP, hub.ReasonQueueFull) + g.refusals(hub.MQTT, hub.ReasonQueueFull); n != 2 {
		t.Errorf("queue-full refusals counted %v, want 2", n)
	}
	g.waitLog(t, "queue full", "device="+md.ID)
	g.sink.full.Store(false)

	// MQTT payload limit (the same max_payload as CoAP): PUBACK 0x95.
	before := g.refusals(hub.MQTT, hub.ReasonTooLarge)
	if rc, _ := mq.Publish(ctx, mq.TelemetryTopic("x"), 1, bytes.Repeat([]byte("a"), 1025)); rc != 0x95 {
		t.Errorf("oversized MQTT publish: PUBACK %#x, want 0x95", rc)
	}
	g.waitLog(t, "mqtt: publish refused: payload too large", "device="+md.ID)
	if n := g.refusals(hub.MQTT, hub.ReasonTooLarge); n != before+1 {
		t.Errorf("MQTT payload_too_large refusals %v, want %v", n, before+1)
	}
}

func TestConfirmableAckedOnlyAfterSinkAccepted(t *testing.T) {
	g := startTransports(t)
	g.sink.block = make(chan chan struct{})
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "slow", "psk")
	co, err := d.DialCoAP(ctx, g.coapAddr(d))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	res := make(chan codes.Code, 1)
	go func() {
		r, err := co.Publish(ctx, "x", []byte("1"))
		if err != nil {
			res <- 0
			return
		}
		res <- r.Code
	}()
	release := <-g.sink.block // Accept is running
	select {
	case c := <-res:
		t.Fatalf("device got %v before the Sink accepted", c)
	default:
	}
	close(release)
	if c := <-res; c != codes.Changed {
		t.Fatalf("after accept: %v, want 2.04", c)
	}

	// Same over MQTT QoS 1: no PUBACK before Accept returns.
	md := g.addDevice(t, "slow2", "cert")
	mq, err := md.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()
	mres := make(chan byte, 1)
	go func() { rc, _ := mq.Publish(ctx, mq.TelemetryTopic("x"), 1, []byte("1")); mres <- rc }()
	release = <-g.sink.block
	select {
	case <-mres:
		t.Fatal("PUBACK before the Sink accepted")
	default:
	}
	close(release)
	if rc := <-mres; rc != 0 {
		t.Fatalf("PUBACK reason %#x after accept", rc)
	}
	g.sink.block = nil
}

func TestMQTTNamespaceAndIdentityRefusals(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	a := g.addDevice(t, "a", "cert")
	b := g.addDevice(t, "b", "cert")

	// A's certificate cannot connect as B.
	before := g.refusals(hub.MQTT, hub.ReasonClientID)
	if _, err := a.DialMQTTAs(ctx, g.g.Addrs()["mqtts"], b.ID, nil); err == nil {
		t.Fatal("A's certificate connected as B")
	}
	g.waitLog(t, "client id is not the authenticated device", "device="+a.ID, "client_id="+b.ID)
	if g.refusals(hub.MQTT, hub.ReasonClientID) != before+1 {
		t.Error("client id mismatch not counted")
	}

	mq, err := a.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()
	for _, topic := range []string{"devices/" + b.ID + "/t/x", "devices/" + a.ID + "/c/x", "bastion/broadcast/x", "devices/" + a.ID + "/x"} {
		if rc, _ := mq.Publish(ctx, topic, 1, []byte("1")); rc != 0x87 {
			t.Errorf("publish on %s: PUBACK %#x, want 0x87 not authorised", topic, rc)
		}
	}
	g.waitLog(t, "publish refused: topic outside the device namespace", "device="+a.ID, "topic=devices/"+b.ID+"/t/x")
	if n := g.refusals(hub.MQTT, hub.ReasonPublishACL); n != 4 {
		t.Errorf("publish refusals %v, want 4", n)
	}
	before = g.refusals(hub.MQTT, hub.ReasonSubscribeACL)
	for _, f := range []string{"devices/" + b.ID + "/c/#", "devices/+/c/#", "#", "devices/" + a.ID + "/#"} {
		if rc, _ := mq.Subscribe(ctx, f); rc < 0x80 {
			t.Errorf("subscribe %s: SUBACK %#x, want a refusal", f, rc)
		}
	}
	// One line per device and kind per 10 s: the first refusal's; the
	// others are counted.
	g.waitLog(t, "subscribe refused", "device="+a.ID, "filter=devices/"+b.ID+"/c/#")
	if n := g.refusals(hub.MQTT, hub.ReasonSubscribeACL); n != before+4 {
		t.Errorf("subscribe_outside_namespace refusals %v, want %v", n, before+4)
	}
	for _, f := range []string{"devices/" + a.ID + "/c/#", "bastion/broadcast/#", "devices/" + a.ID + "/c/+/x"} {
		if rc, err := mq.Subscribe(ctx, f); err != nil || rc >= 0x80 {
			t.Errorf("subscribe %s: SUBACK %#x %v, want granted", f, rc, err)
		}
	}
	if len(g.sink.messages()) != 0 {
		t.Errorf("refused publishes reached the sink: %+v", g.sink.messages())
	}
}

func TestCertificateAndPSKRefusals(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "old", "cert")

	// Expired: the gateway's clock moves past the certificate's end.
	g.clock.Set(400 * 24 * time.Hour)
	if _, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil); err == nil {
		t.Error("expired certificate accepted over MQTT")
	}
	g.waitLog(t, "mqtt: handshake refused: device certificate not accepted", "device="+d.ID, "reason=cert_expired")
	if _, err := d.DialCoAP(ctxT(t, 10*time.Second), g.coapAddr(d)); err == nil {
		t.Error("expired certificate accepted over CoAP")
	}
	g.waitLog(t, "coap: handshake refused: device certificate not accepted", "device="+d.ID, "reason=cert_expired")
	g.clock.Set(0)
	if g.refusals(hub.MQTT, hub.ReasonExpired) < 1 || g.refusals(hub.CoAP, hub.ReasonExpired) < 1 {
		t.Error("expired certificates not counted on both stacks")
	}

	// Wrong CA over MQTT.
	before := g.refusals(hub.MQTT, hub.ReasonWrongCA)
	cp, kp := foreignDeviceCert(t, d.ID, time.Hour)
	evil := *d
	evil.CertPEM, evil.KeyPEM = cp, kp
	if _, err := evil.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil); err == nil {
		t.Error("foreign CA accepted over MQTT")
	}
	g.waitLog(t, "mqtt: handshake refused", "device="+d.ID, "reason=wrong_ca")
	if n := g.refusals(hub.MQTT, hub.ReasonWrongCA); n != before+1 {
		t.Errorf("MQTT wrong_ca refusals %v, want %v", n, before+1)
	}

	// Unknown PSK identity.
	before = g.refusals(hub.CoAP, hub.ReasonUnknownPSK)
	raddr, _ := net.ResolveUDPAddr("udp", g.g.Addrs()["coaps_psk"])
	conn, err := piondtls.Dial("udp", raddr, &piondtls.Config{
		PSK:             func([]byte) ([]byte, error) { return []byte("0123456789abcdef"), nil },
		PSKIdentityHint: []byte("nobody-knows-me"),
		CipherSuites:    pki.DTLSPSKSuites, ExtendedMasterSecret: piondtls.RequireExtendedMasterSecret,
	})
	if err == nil {
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = conn.HandshakeContext(hctx)
		cancel()
		conn.Close()
	}
	if err == nil {
		t.Error("unknown PSK identity completed a handshake")
	}
	g.waitLog(t, "PSK identity not accepted", "psk_identity=nobody-knows-me", "reason=unknown_psk_identity")
	if g.refusals(hub.CoAP, hub.ReasonUnknownPSK) != before+1 {
		t.Error("unknown PSK identity not counted")
	}
}

func TestRevokedDeviceSessionsCloseWithinOneSecond(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	pd := g.addDevice(t, "psk-dev", "psk")
	cd := g.addDevice(t, "cert-dev", "cert")
	co, err := pd.DialCoAP(ctx, g.coapAddr(pd))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	if r, err := co.Publish(ctx, "x", []byte("1")); err != nil || r.Code != codes.Changed {
		t.Fatalf("before revocation: %v %v", r.Code, err)
	}
	cc, err := cd.DialCoAP(ctx, g.coapAddr(cd))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if r, err := cc.Publish(ctx, "x", []byte("1")); err != nil || r.Code != codes.Changed {
		t.Fatalf("cert device before revocation: %v %v", r.Code, err)
	}
	mq, err := cd.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()

	start := time.Now()
	for _, d := range []*devicesim.Device{pd, cd} {
		if _, err := g.g.Devices().Revoke(d.ID, Actor{Name: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	for name, done := range map[string]<-chan struct{}{"mqtt": mq.Done()} {
		select {
		case <-done:
		case <-time.After(time.Second - time.Since(start)):
			t.Errorf("%s session of a revoked device still open after 1s", name)
		}
	}
	// The gateway closed the DTLS sessions (close_notify): the server side
	// is gone within 1 s, and a request on them gets no answer.
	for time.Since(start) < time.Second && (g.g.coap.Sessions(pd.ID) > 0 || g.g.coap.Sessions(cd.ID) > 0) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := g.g.coap.Sessions(pd.ID) + g.g.coap.Sessions(cd.ID); n != 0 {
		t.Errorf("%d CoAP sessions of revoked devices still open after 1s", n)
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if r, err := co.Publish(pctx, "x", []byte("1")); err == nil && r.Code == codes.Changed {
		t.Error("revoked PSK device's old session still accepted telemetry")
	}
	cancel()
	g.waitLog(t, "closing sessions of revoked device", "device="+pd.ID)
	g.waitLog(t, "mqtt: closing session of revoked device", "device="+cd.ID)
	if n := g.refusals(hub.MQTT, hub.ReasonRevoked); n != 1 {
		t.Errorf("MQTT revoked refusals %v after the session was closed, want 1", n)
	}
	// New sessions are refused.
	if _, err := pd.DialCoAP(ctxT(t, 10*time.Second), g.coapAddr(pd)); err == nil {
		t.Error("revoked PSK device completed a new handshake")
	}
	g.waitLog(t, "PSK identity not accepted", "device="+pd.ID, "reason=revoked")
	if g.refusals(hub.CoAP, hub.ReasonRevoked) < 1 {
		t.Error("revoked refusal not counted")
	}
	if _, err := cd.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil); err == nil {
		t.Error("revoked certificate device connected over MQTT again")
	}
	g.waitLog(t, "mqtt: handshake refused", "device="+cd.ID, "reason=revoked")
	if n := g.refusals(hub.MQTT, hub.ReasonRevoked); n != 2 {
		t.Errorf("MQTT revoked refusals %v after the new connection, want 2", n)
	}
}

func TestRetainedMessagesSurviveRestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, dir, nil)
	ctx := ctxT(t, 30*time.Second)
	keyPEM, csr, err := devicesim.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	c, err := r.g.Devices().Add(AddRequest{Name: "st", Auth: "cert", CSR: string(csr)}, Actor{Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	d := &devicesim.Device{Creds: devicesim.Creds{ID: c.ID, Auth: "cert", CertPEM: c.CertPEM, CAPEM: c.CAPEM, KeyPEM: string(keyPEM)}}
	mq, err := d.DialMQTT(ctx, r.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	topic := "devices/" + c.ID + "/s/online"
	if rc, err := mq.PublishRetained(ctx, topic, []byte("yes")); err != nil || rc != 0 {
		t.Fatalf("retained publish: %#x %v", rc, err)
	}
	mq.Close()
	r.stop(t)

	r2 := start(t, dir, nil)
	defer r2.stop(t)
	var got []string
	r2.g.Store().ForEachRetained(func(tp string, v []byte) error {
		got = append(got, tp)
		return nil
	})
	if len(got) != 1 || got[0] != topic {
		t.Errorf("retained topics in the store after restart: %v, want [%s]", got, topic)
	}
	// Ready fires while the broker's Serve (which loads the store) may
	// still be starting: wait for it, bounded.
	m, ok := r2.g.mqtt.Retained(topic)
	for deadline := time.Now().Add(5 * time.Second); !ok && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		m, ok = r2.g.mqtt.Retained(topic)
	}
	if !ok || string(m) != "yes" {
		t.Errorf("broker after restart has retained %q (%v), want yes", m, ok)
	}
}

// clientHello captures the first flight of a real pion DTLS PSK client.
func clientHello(t *testing.T) []byte {
	t.Helper()
	return firstFlight(t, &piondtls.Config{
		PSK:             func([]byte) ([]byte, error) { return []byte("0123456789abcdef"), nil },
		PSKIdentityHint: []byte("x"), CipherSuites: pki.DTLSPSKSuites,
	})
}

func TestMQTTSecretLoginAndOneSessionPerDevice(t *testing.T) {
	g := startTransportsWith(t, true)
	ctx := ctxT(t, 30*time.Second)
	d := g.addDevice(t, "legacy", "secret")
	m1, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatalf("secret login: %v", err)
	}
	defer m1.Close()
	// A second connection of the same device takes the session over.
	m2, err := d.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	select {
	case <-m1.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("first session still open after the device connected again")
	}
	g.waitLog(t, "one session per device", "device="+d.ID)
	if rc, err := m2.Publish(ctx, m2.TelemetryTopic("x"), 1, []byte("1")); err != nil || rc != 0 {
		t.Errorf("publish on the new session: %#x %v", rc, err)
	}

	// Wrong secret, and no certificate and no secret at all.
	bad := *d
	bad.Secret = "wrong"
	if _, err := bad.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil); err == nil {
		t.Error("wrong secret accepted")
	}
	g.waitLog(t, "secret login failed", "device="+d.ID, "reason=bad_secret")
	none := *d
	none.Auth, none.Secret = "none", ""
	if _, err := none.DialMQTT(ctx, g.g.Addrs()["mqtts"], nil); err == nil {
		t.Error("connection without credentials accepted")
	}
	g.waitLog(t, "connect refused: no client certificate", "reason=no_credentials")
}

func TestLibcoapObserveReceivesCommands(t *testing.T) {
	cc := testenv.RequireCommand(t, "coap-client-openssl")
	g := startTransports(t)
	d := g.addDevice(t, "blinker", "psk")
	key, _ := hex.DecodeString(d.PSK)
	ctx := ctxT(t, 30*time.Second)
	cmd := exec.CommandContext(ctx, cc, "-u", d.PSKIdentity, "-k", string(key), "-m", "get", "-s", "10", "-B", "12",
		"coaps://"+g.g.Addrs()["coaps_psk"]+"/c/led")
	var out logbuf.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-done
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	// Each command differs, so a second one seen can only have come as an
	// Observe notification (the first may be the GET's own answer).
	n := 0
	for strings.Count(out.String(), "blink-") < 2 {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("coap-client ended before a command arrived: %v\n%s", err, out.String())
		case <-ctx.Done():
			t.Fatalf("no command reached the libcoap observer:\n%s", out.String())
		case <-tick.C: // until the observation is registered
			n++
			if err := g.g.Deliver(ctx, bridges.Message{Device: d.ID, Topic: "devices/" + d.ID + "/c/led", Payload: []byte(fmt.Sprintf("blink-%d", n))}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestDTLSConnectionIDNegotiated(t *testing.T) {
	g := startTransports(t)
	d := g.addDevice(t, "roamer", "psk")
	// A UDP relay between device and gateway records the content type of
	// every datagram the device sends: with a connection ID from the
	// gateway, application data travels as tls12_cid records (type 25).
	relay, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	up, err := net.Dial("udp", g.coapAddr(d))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	var mu sync.Mutex
	types := map[byte]bool{}
	var client net.Addr
	relayDone := make(chan struct{}, 2)
	go func() {
		defer func() { relayDone <- struct{}{} }()
		buf := make([]byte, 4096)
		for {
			n, from, err := relay.ReadFrom(buf)
			if err != nil {
				return
			}
			mu.Lock()
			client = from
			types[buf[0]] = true
			mu.Unlock()
			up.Write(buf[:n])
		}
	}()
	go func() {
		defer func() { relayDone <- struct{}{} }()
		buf := make([]byte, 4096)
		for {
			n, err := up.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			c := client
			mu.Unlock()
			relay.WriteTo(buf[:n], c)
		}
	}()
	ctx := ctxT(t, 10*time.Second)
	co, err := d.DialCoAP(ctx, relay.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	if r, err := co.Publish(ctx, "x", []byte("1")); err != nil || r.Code != codes.Changed {
		t.Fatalf("publish through the relay: %v %v", r.Code, err)
	}
	co.Close()
	relay.Close()
	up.Close()
	<-relayDone
	<-relayDone
	mu.Lock()
	defer mu.Unlock()
	if !types[25] {
		t.Errorf("device sent record types %v, no tls12_cid (25): connection ID not in use", types)
	}
}

// Device → Bastion → cloud and back, through the upstream link to a real
// Mosquitto (TLS 1.3, require_certificate): CoAP and MQTT telemetry arrive
// on the mapped cloud topics, and a command the cloud publishes reaches a
// CoAP observer.
func TestDevicesThroughUpstreamToCloud(t *testing.T) {
	r, b, cloud, dir := startWithCloud(t)
	defer r.stop(t)
	tg := &tgw{running: r, log: &logbuf.Buffer{}, dir: dir}
	ctx := ctxT(t, 30*time.Second)

	// The cloud side: a subscriber with a cloud client certificate.
	sub := cloud.Client(t, "cloud-app")
	app := &devicesim.Device{Creds: devicesim.Creds{ID: "cloud-app", Auth: "cert", CertPEM: string(sub.CertPEM), KeyPEM: string(sub.KeyPEM), CAPEM: string(cloud.CertPEM)}}
	got := make(chan [2]string, 10)
	cl, err := app.DialMQTT(ctx, b.Addr, func(topic string, p []byte) { got <- [2]string{topic, string(p)} })
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if rc, err := cl.Subscribe(ctx, "bastion/bastion-dev/+/t/#"); err != nil || rc >= 0x80 {
		t.Fatalf("cloud subscribe: %#x %v", rc, err)
	}

	cd := tg.addDevice(t, "coap-dev", "psk")
	md := tg.addDevice(t, "mqtt-dev", "cert")
	co, err := cd.DialCoAP(ctx, tg.coapAddr(cd))
	if err != nil {
		t.Fatal(err)
	}
	defer co.Close()
	if res, err := co.Publish(ctx, "temp", []byte("21.5")); err != nil || res.Code != codes.Changed {
		t.Fatalf("CoAP publish: %v %v", res.Code, err)
	}
	expectMsg(t, got, "bastion/bastion-dev/"+cd.ID+"/t/temp", "21.5")
	mq, err := md.DialMQTT(ctx, r.g.Addrs()["mqtts"], nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mq.Close()
	if rc, err := mq.Publish(ctx, mq.TelemetryTopic("energy"), 1, []byte("42")); err != nil || rc != 0 {
		t.Fatalf("MQTT publish: %#x %v", rc, err)
	}
	expectMsg(t, got, "bastion/bastion-dev/"+md.ID+"/t/energy", "42")

	// Downlink: the cloud commands the CoAP device.
	cmds := make(chan string, 10)
	if _, err := co.Observe(ctx, "led", func(p []byte) { cmds <- string(p) }); err != nil {
		t.Fatal(err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case c := <-cmds:
			if !strings.HasPrefix(c, "on-") {
				t.Fatalf("command %q", c)
			}
			return
		case <-ctx.Done():
			t.Fatal("no cloud command reached the CoAP observer")
		case <-tick.C: // until the link's downlink subscription is in place
			if _, err := cl.Publish(ctx, "bastion/bastion-dev/"+cd.ID+"/c/led", 1, []byte(fmt.Sprintf("on-%d", n))); err != nil {
				t.Fatal(err)
			}
		}
	}
}

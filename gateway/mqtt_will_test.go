package gateway

import (
	"context"
	"crypto/tls"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
)

// dialWill connects d over MQTT 5 with a Will and returns the client, its
// TLS connection (close it to drop the connection without DISCONNECT) and
// the CONNACK reason.
func dialWill(ctx context.Context, t *testing.T, addr string, d *devicesim.Device, will *paho.WillMessage) (*paho.Client, net.Conn, byte) {
	t.Helper()
	cfg, err := d.TLSConfig(addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := paho.NewClient(paho.ClientConfig{Conn: conn})
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: d.ID, KeepAlive: 60, CleanStart: true, WillMessage: will})
	if ca == nil {
		t.Fatalf("CONNECT with a Will on %s: no CONNACK: %v", will.Topic, err)
	}
	return c, conn, ca.ReasonCode
}

// TestMQTTWillOutsideNamespaceRefused: the auditor's attack. Device A
// connects with a Will on device B's command topic (or, retained, on the
// gateway's broadcast tree) and would drop its connection so that the
// broker publishes it. CONNECT is refused (0x87), counted and logged; B,
// subscribed to both trees, receives nothing; nothing is retained in the
// broker or the store. A Will in A's own namespace still works: it reaches
// the Sink and is retained when A drops its connection.
func TestMQTTWillOutsideNamespaceRefused(t *testing.T) {
	g := startTransports(t)
	ctx := ctxT(t, 30*time.Second)
	addr := g.g.Addrs()["mqtts"]
	a := g.addDevice(t, "a", "cert")
	b := g.addDevice(t, "b", "cert")
	got := make(chan string, 10)
	mb, err := b.DialMQTT(ctx, addr, func(topic string, payload []byte) { got <- topic + " " + string(payload) })
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Close()
	for _, f := range []string{"devices/" + b.ID + "/c/#", "bastion/broadcast/#"} {
		if rc, err := mb.Subscribe(ctx, f); err != nil || rc >= 0x80 {
			t.Fatalf("B subscribes %s: %#x %v", f, rc, err)
		}
	}

	forged := []*paho.WillMessage{
		{Topic: "devices/" + b.ID + "/c/unlock", Payload: []byte("1"), QoS: 1},
		{Topic: "bastion/broadcast/firmware", Payload: []byte("evil"), QoS: 1, Retain: true},
	}
	for _, will := range forged {
		before := g.refusals(hub.MQTT, hub.ReasonPublishACL)
		c, conn, rc := dialWill(ctx, t, addr, a, will)
		if rc != 0x87 {
			t.Errorf("Will on %s: CONNACK %#x, want 0x87 not authorized", will.Topic, rc)
		}
		conn.Close() // as the auditor did: a session would now send the Will
		<-c.Done()
		if n := g.refusals(hub.MQTT, hub.ReasonPublishACL); n != before+1 {
			t.Errorf("Will on %s: publish_outside_namespace refusals %v, want %v", will.Topic, n, before+1)
		}
	}

	// A's own status Will, delivered when A drops the connection.
	own := "devices/" + a.ID + "/s/online"
	c, conn, rc := dialWill(ctx, t, addr, a, &paho.WillMessage{Topic: own, Payload: []byte("offline"), QoS: 1, Retain: true})
	if rc != 0 {
		t.Fatalf("Will on %s: CONNACK %#x, want 0", own, rc)
	}
	conn.Close()
	<-c.Done()
	// mochi retains in its index, then the hook writes the store: wait
	// for the store, bounded.
	storedRetained := func() []string {
		var stored []string
		if err := g.g.Store().ForEachRetained(func(tp string, _ []byte) error { stored = append(stored, tp); return nil }); err != nil {
			t.Fatal(err)
		}
		return stored
	}
	deadline := time.Now().Add(5 * time.Second)
	for p, ok := g.g.mqtt.Retained(own); !ok || string(p) != "offline" || len(storedRetained()) == 0; p, ok = g.g.mqtt.Retained(own) {
		if time.Now().After(deadline) {
			t.Fatalf("A's own Will not retained within 5 s (%q %v)", p, ok)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if ms := g.sink.messages(); len(ms) != 1 || ms[0].Device != a.ID || ms[0].Topic != own || string(ms[0].Payload) != "offline" {
		t.Errorf("sink got %+v, want A's Will only", ms)
	}
	if stored := storedRetained(); len(stored) != 1 || stored[0] != own {
		t.Errorf("retained topics in the store: %q, want only %s", stored, own)
	}
	if _, ok := g.g.mqtt.Retained("bastion/broadcast/firmware"); ok {
		t.Error("a forged broadcast is retained")
	}
	// A command the gateway sends B now reaches B after anything the
	// broker published to B before it: it must be the first thing B got.
	marker := "devices/" + b.ID + "/c/marker"
	if err := g.g.Deliver(ctx, bridges.Message{Device: b.ID, Topic: marker, Payload: []byte("m"), QoS: 1}); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m != marker+" m" {
			t.Errorf("B received %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("B got nothing within 5 s, not even the gateway's command")
	}
	for _, will := range forged {
		g.waitLog(t, "mqtt: connect refused: Will refused: topic outside the device namespace", "device="+a.ID,
			"will_topic="+will.Topic, "reason="+hub.ReasonPublishACL)
	}
}

// TestMosquittoWillOutsideNamespaceRefused: a real MQTT 3.1.1 client
// (mosquitto_pub) with a Will on another device's command topic is
// refused with CONNACK 0x05 not authorised and publishes nothing.
func TestMosquittoWillOutsideNamespaceRefused(t *testing.T) {
	pub := testenv.RequireCommand(t, "mosquitto_pub")
	g := startTransports(t)
	a := g.addDevice(t, "a", "cert")
	b := g.addDevice(t, "b", "cert")
	tmp := t.TempDir()
	host, port, _ := net.SplitHostPort(g.g.Addrs()["mqtts"])
	before := g.refusals(hub.MQTT, hub.ReasonPublishACL)
	out, err := exec.CommandContext(ctxT(t, 20*time.Second), pub, "-h", host, "-p", port,
		"--cafile", writeFile(t, tmp, "ca.pem", a.CAPEM), "--cert", writeFile(t, tmp, "c.pem", a.CertPEM),
		"--key", writeFile(t, tmp, "k.pem", a.KeyPEM), "-i", a.ID, "-V", "mqttv311", "-q", "1",
		"--will-topic", "devices/"+b.ID+"/c/unlock", "--will-payload", "1", "--will-qos", "1",
		"-t", "devices/"+a.ID+"/t/x", "-m", "1").CombinedOutput()
	if err == nil {
		t.Fatalf("mosquitto_pub with a Will on B's command topic succeeded:\n%s", out)
	}
	if !strings.Contains(string(out), "not authorised") {
		t.Errorf("mosquitto_pub said %q, want the CONNACK's not authorised", out)
	}
	g.waitLog(t, "Will refused: topic outside the device namespace", "device="+a.ID)
	if n := g.refusals(hub.MQTT, hub.ReasonPublishACL); n != before+1 {
		t.Errorf("publish_outside_namespace refusals %v, want %v", n, before+1)
	}
	if len(g.sink.messages()) != 0 {
		t.Errorf("sink got %+v", g.sink.messages())
	}
}

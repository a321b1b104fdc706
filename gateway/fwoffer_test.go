package gateway

// A firmware offer reaches an MQTT device that subscribes after it was
// announced, and a withdrawn offer does not: real mosquitto_sub over TLS
// with the device's certificate against a real dev gateway.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/internal/devicesim"
	"github.com/bastion-iot/bastion/internal/testenv"
	"github.com/bastion-iot/bastion/internal/testutil/tufrepo"
	otacache "github.com/bastion-iot/bastion/ota-cache"
)

// mosquittoSub runs mosquitto_sub as device d: it subscribes to filter
// and prints the first message it gets (-C 1), giving up after 20 s.
type mosquittoSub struct {
	out  bytes.Buffer
	done chan error
}

func startMosquittoSub(t *testing.T, g *fwgw, d *devicesim.Device, version, filter string) *mosquittoSub {
	t.Helper()
	sub := testenv.RequireCommand(t, "mosquitto_sub")
	tmp := t.TempDir()
	host, port, _ := net.SplitHostPort(g.g.Addrs()["mqtts"])
	args := []string{"-h", host, "-p", port, "--cafile", writeFile(t, tmp, "ca.pem", d.CAPEM),
		"--cert", writeFile(t, tmp, "c.pem", d.CertPEM), "--key", writeFile(t, tmp, "k.pem", d.KeyPEM), "-i", d.ID,
		"-V", version, "-q", "1", "-C", "1", "-W", "20", "-t", filter}
	cmd := exec.CommandContext(ctxT(t, 30*time.Second), sub, args...)
	m := &mosquittoSub{done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = &m.out, &m.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-m.done
	})
	return m
}

// wait returns what mosquitto_sub printed once it has exited.
func (m *mosquittoSub) wait(t *testing.T) string {
	t.Helper()
	select {
	case err := <-m.done:
		m.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("mosquitto_sub: %v\n%s", err, m.out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("mosquitto_sub did not exit within 30s")
	}
	return strings.TrimSpace(m.out.String())
}

// waitOffers polls bastion_firmware_offers_total{trigger,result} until it
// reaches want.
func waitOffers(t *testing.T, g *Gateway, trigger, result string, want float64) {
	t.Helper()
	c := g.metrics.offers.WithLabelValues(trigger, result)
	deadline := time.Now().Add(20 * time.Second)
	for testutil.ToFloat64(c) < want {
		if time.Now().After(deadline) {
			t.Fatalf("bastion_firmware_offers_total{trigger=%q,result=%q} = %v, want %v", trigger, result, testutil.ToFloat64(c), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFirmwareOfferReachesLateMQTTSubscriber(t *testing.T) {
	testenv.RequireCommand(t, "mosquitto_sub")
	v := newFWVendor(t)
	v.publish(t, fwClassB, "2.0", 1, tufrepo.Image(1000, 2)) // a repository with another class only
	g := startFirmwareGateway(t, v)
	// The check at start is over before the devices exist (on a loaded
	// machine it could otherwise announce to one of them, and the next
	// check would see no change for the other).
	g.check(t)
	ma, _ := g.addFWDevice(t, "meter-a", "cert", fwClassA)
	mb, _ := g.addFWDevice(t, "meter-b", "cert", fwClassA)
	img := tufrepo.Image(4000, 1)
	sha := v.publish(t, fwClassA, "1.1.0", 1, img)
	// The offer is announced now, while no device is connected.
	g.check(t)
	waitOffers(t, g.g, "change", "sent", 2)
	topic := coap.OfferTopic(ma.ID)

	checkOffer := func(t *testing.T, got string, device string) {
		t.Helper()
		var o otacache.Offer
		if err := json.Unmarshal([]byte(got), &o); err != nil || o.Device != device || o.Version != "1.1.0" || o.SHA256 != sha || len(o.Manifest) == 0 {
			t.Fatalf("late subscriber got %q (%v), want the 1.1.0 offer %s for %s", got, err, sha, device)
		}
		if _, err := otacache.VerifyManifest(o.Manifest, v.key.Public()); err != nil {
			t.Errorf("offer's manifest does not verify with the vendor key: %v", err)
		}
	}
	t.Run("MQTT 3.1.1 subscriber to the offer topic", func(t *testing.T) {
		checkOffer(t, startMosquittoSub(t, g, ma, "mqttv311", topic).wait(t), ma.ID)
	})
	t.Run("MQTT 5 subscriber to its whole command tree", func(t *testing.T) {
		checkOffer(t, startMosquittoSub(t, g, mb, "mqttv5", "devices/"+mb.ID+"/c/#").wait(t), mb.ID)
	})

	t.Run("withdrawn offer is announced as withdrawn and not delivered to a late subscriber", func(t *testing.T) {
		// ma reports 1.1.0 installed (over MQTT, as a device does): the
		// offer is withdrawn for it.
		// The device, subscribed, hears the withdrawal: an empty payload.
		ctx := ctxT(t, 20*time.Second)
		got := make(chan []byte, 4)
		withdrawn := testutil.ToFloat64(g.g.metrics.offers.WithLabelValues("change", "withdrawn"))
		mq, err := ma.DialMQTT(ctx, g.g.Addrs()["mqtts"], func(tp string, p []byte) {
			if tp == topic {
				got <- p
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		if rc, err := mq.Subscribe(ctx, topic); err != nil || rc >= 0x80 {
			t.Fatalf("subscribe: rc %#x %v", rc, err)
		}
		select {
		case p := <-got:
			checkOffer(t, string(p), ma.ID) // sent on subscribe
		case <-time.After(20 * time.Second):
			t.Fatal("no offer on subscribe")
		}
		report, _ := json.Marshal(otacache.DeviceStatus{State: otacache.StateInstalled, Version: "1.1.0", SHA256: sha})
		if rc, err := mq.Publish(ctx, statusTopic(ma.ID), 1, report); err != nil || rc >= 0x80 {
			t.Fatalf("status report: rc %#x %v", rc, err)
		}
		select {
		case p := <-got:
			if len(p) != 0 {
				t.Errorf("after installed the device got %q, want the empty withdrawal", p)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("no withdrawal after installed")
		}
		mq.Close()
		waitOffers(t, g.g, "change", "withdrawn", withdrawn+1)
		if o, ok := g.g.Firmware().Offer(ma.ID); ok {
			t.Fatalf("offer still in force after installed: %+v", o)
		}
		none := testutil.ToFloat64(g.g.metrics.offers.WithLabelValues("subscribe", "none"))
		s := startMosquittoSub(t, g, ma, "mqttv311", topic)
		// Once the gateway has judged the new subscription (nothing to
		// send), a marker on the same topic must be the first and only
		// thing the device gets.
		waitOffers(t, g.g, "subscribe", "none", none+1)
		if err := g.g.Deliver(context.Background(), bridges.Message{Device: ma.ID, Topic: topic, Payload: []byte("marker"), QoS: 1}); err != nil {
			t.Fatal(err)
		}
		if got := s.wait(t); got != "marker" {
			t.Errorf("subscriber after withdrawal got %q first, want only the marker", got)
		}
	})

	t.Run("revoked device's subscription is refused", func(t *testing.T) {
		if _, err := g.g.Devices().Revoke(mb.ID, Actor{Name: "test"}); err != nil {
			t.Fatal(err)
		}
		sent := testutil.ToFloat64(g.g.metrics.offers.WithLabelValues("subscribe", "sent"))
		s := startMosquittoSub(t, g, mb, "mqttv311", coap.OfferTopic(mb.ID))
		select {
		case err := <-s.done:
			s.done <- err
			if err == nil {
				t.Errorf("revoked device's mosquitto_sub succeeded: %s", s.out.String())
			}
		case <-time.After(30 * time.Second):
			t.Fatal("revoked device's mosquitto_sub still running after 30s")
		}
		if got := testutil.ToFloat64(g.g.metrics.offers.WithLabelValues("subscribe", "sent")); got != sent {
			t.Errorf("offers sent on subscribe went from %v to %v for a revoked device", sent, got)
		}
	})
}

func TestFilterMatches(t *testing.T) {
	topic := "devices/d1/c/fw/offer"
	for f, want := range map[string]bool{
		"devices/d1/c/fw/offer":   true,
		"devices/d1/c/#":          true,
		"devices/d1/c/fw/#":       true,
		"devices/d1/c/fw/offer/#": true, // "#" also matches the parent level
		"devices/d1/c/+/offer":    true,
		"devices/+/c/fw/+":        true,
		"#":                       true,
		"devices/d1/c/fw":         false,
		"devices/d1/c/fw/offer/x": false,
		"devices/d2/c/#":          false,
		"devices/d1/c/+":          false,
		"devices/d1/c/#/offer":    false, // not a valid filter
		"devices/d1/t/#":          false,
		"bastion/broadcast/#":     false,
	} {
		if got := filterMatches(f, topic); got != want {
			t.Errorf("filterMatches(%q, %q) = %v, want %v", f, topic, got, want)
		}
	}
}

// dialPersistent connects as d with MQTT 5, clean start off and a session
// kept for 5 minutes, so that a reconnection resumes the subscriptions.
func dialPersistent(t *testing.T, ctx context.Context, addr string, d *devicesim.Device, got chan<- string) *paho.Client {
	t.Helper()
	cfg, err := d.TLSConfig(addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: &lockedNetConn{Conn: conn},
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			got <- string(pr.Packet.Payload)
			return true, nil
		}}})
	expiry := uint32(300)
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: d.ID, KeepAlive: 60, CleanStart: false,
		Properties: &paho.ConnectProperties{SessionExpiryInterval: &expiry}})
	if err != nil {
		conn.Close()
		t.Fatalf("CONNECT: %v %+v", err, ca)
	}
	t.Cleanup(func() { conn.Close(); <-c.Done() })
	return c
}

// lockedNetConn keeps paho's packet writes whole (see devicesim's lockedConn).
type lockedNetConn struct {
	net.Conn
	sync.Mutex
}

func TestFirmwareOfferReachesResumedMQTTSession(t *testing.T) {
	v := newFWVendor(t)
	v.publish(t, fwClassA, "1.1.0", 1, tufrepo.Image(3000, 1))
	g := startFirmwareGateway(t, v)
	d, _ := g.addFWDevice(t, "meter-a", "cert", fwClassA)
	g.check(t)
	addr := g.g.Addrs()["mqtts"]
	ctx := ctxT(t, 30*time.Second)
	got := make(chan string, 8)
	expectOffer := func(t *testing.T, when string) {
		t.Helper()
		select {
		case m := <-got:
			var o otacache.Offer
			if err := json.Unmarshal([]byte(m), &o); err != nil || o.Device != d.ID || o.Version != "1.1.0" {
				t.Fatalf("%s: got %q (%v), want the 1.1.0 offer", when, m, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s: no offer within 20s", when)
		}
	}

	// A persistent session subscribes, gets the offer, and goes away.
	c := dialPersistent(t, ctx, addr, d, got)
	if sa, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: coap.OfferTopic(d.ID), QoS: 1}}}); err != nil || sa.Reasons[0] >= 0x80 {
		t.Fatalf("SUBSCRIBE: %v %+v", err, sa)
	}
	expectOffer(t, "on subscribe")
	if err := c.Disconnect(&paho.Disconnect{ReasonCode: 0}); err != nil {
		t.Fatal(err)
	}

	// Back on its kept session without subscribing again (a device that
	// rebooted and trusts its session): nothing was published meanwhile,
	// so only the gateway's look at the resumed subscriptions sends it.
	dialPersistent(t, ctx, addr, d, got)
	expectOffer(t, "on the resumed session")
	// The counter moves after the delivery the device already saw.
	waitOffers(t, g.g, "subscribe", "sent", 2)
	if n := testutil.ToFloat64(g.g.metrics.offers.WithLabelValues("subscribe", "sent")); n != 2 {
		t.Errorf("offers sent on subscribe = %v, want 2 (subscribe, resume)", n)
	}
}

// FuzzFilterMatches: the topic filters a device subscribes with (granted by
// the broker's ACL, so within its namespace), seeded with the filters the
// tests' mosquitto_sub and paho clients send.
func FuzzFilterMatches(f *testing.F) {
	for _, s := range []string{"devices/d1/c/fw/offer", "devices/d1/c/#", "devices/d1/c/+/offer", "bastion/broadcast/#", "#", "+", "", "/", "devices//c/#"} {
		f.Add(s, "devices/d1/c/fw/offer")
	}
	f.Fuzz(func(t *testing.T, filter, topic string) {
		got := filterMatches(filter, topic)
		if !strings.ContainsAny(filter, "+#") && got != (filter == topic) {
			t.Fatalf("filterMatches(%q, %q) = %v for a filter without wildcards", filter, topic, got)
		}
		if filter == "#" && !got {
			t.Fatalf("%q does not match %q", filter, topic)
		}
		if got && !strings.ContainsAny(filter, "#") && strings.Count(filter, "/") != strings.Count(topic, "/") {
			t.Fatalf("filterMatches(%q, %q): matched a topic of another depth without #", filter, topic)
		}
	})
}

package upstream

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	goleak.VerifyTestMain(m)
}

func testLog() *slog.Logger {
	if os.Getenv("BASTION_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// linkConfig is a config for a gateway "gw1" talking to b with a fresh
// client certificate from b's CA.
func linkConfig(t testing.TB, b *mosquitto.Broker, cn string) Config {
	leaf := b.CA.Client(t, cn)
	return Config{
		Broker:     "mqtts://" + b.Addr,
		ServerName: mosquitto.ServerName,
		CAFile:     b.CA.CertFile, CertFile: leaf.CertFile, KeyFile: leaf.KeyFile,
		Gateway:    "gw1",
		BackoffMin: 20 * time.Millisecond, BackoffMax: 300 * time.Millisecond,
		ConnectTimeout: 2 * time.Second,
		Forward:        []Rule{{Topic: "devices/+/t/#", Action: ActionForward}},
	}
}

// link is a running queue + upstream pair.
type link struct {
	q        *queue.Queue
	up       *Upstream
	reg      *prometheus.Registry
	commands chan bridges.Message
	cancel   context.CancelFunc
	done     chan error
}

func startLink(t testing.TB, cfg Config, dir string) *link {
	t.Helper()
	return startLinkWith(t, cfg, dir, nil)
}

// startLinkWith is startLink with before run on the link before it starts.
func startLinkWith(t testing.TB, cfg Config, dir string, before func(*Upstream)) *link {
	t.Helper()
	l := &link{reg: prometheus.NewRegistry(), commands: make(chan bridges.Message, 100), done: make(chan error, 1)}
	var err error
	l.q, err = queue.Open(dir, queue.Options{}, testLog(), l.reg)
	if err != nil {
		t.Fatalf("queue.Open: %v", err)
	}
	l.up, err = New(cfg, l.q, func(ctx context.Context, m bridges.Message) error {
		l.commands <- m
		return nil
	}, testLog(), l.reg)
	if err != nil {
		l.q.Close()
		t.Fatalf("upstream.New: %v", err)
	}
	if before != nil {
		before(l.up)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l.cancel = cancel
	go func() { l.done <- l.up.Run(ctx) }()
	t.Cleanup(l.stop)
	return l
}

func (l *link) stop() {
	if l.cancel == nil {
		return
	}
	l.cancel()
	<-l.done
	l.cancel = nil
	l.q.Close()
}

// waitFor polls cond until it holds (bounded).
func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// publish sends one message from a separate client (the cloud side).
func cloudPublish(t testing.TB, b *mosquitto.Broker, cn string, p *paho.Publish) {
	t.Helper()
	conn, err := tls.Dial("tcp", b.Addr, b.ClientTLS(b.CA.Client(t, cn)))
	if err != nil {
		t.Fatalf("cloud client dial: %v", err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: packets.NewThreadSafeConn(conn), ClientID: cn})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: cn, CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatalf("cloud client connect: %v", err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	if _, err := c.Publish(ctx, p); err != nil {
		t.Fatalf("cloud publish %s: %v", p.Topic, err)
	}
}

func userProp(p *paho.Publish, key string) string {
	if p.Properties == nil {
		return ""
	}
	return p.Properties.User.Get(key)
}

func telemetry(dev string, i int) bridges.Message {
	return bridges.Message{Device: dev, Topic: "devices/" + dev + "/t/n", QoS: 1, Payload: fmt.Appendf(nil, `{"dev":%q,"i":%d}`, dev, i)}
}

// parkedOne is the condition that the parking queue p holds one message and
// the link l has finished parking it: the parking queue holds it before the
// link deletes it from the main queue, counts it and sets Status().LastParked
// (last), so waiting on the depth alone raced with those checks.
func parkedOne(l *link, p *queue.Queue) func() bool {
	return func() bool { return p.Stats().Depth == 1 && l.up.Status().LastParked != "" }
}

package upstream

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/mosquitto"
	"github.com/eclipse/paho.golang/autopaho"
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

// subscriber is a real MQTT v5 client (paho autopaho) on the broker.
type subscriber struct {
	cm  *autopaho.ConnectionManager
	got chan *paho.Publish
}

// subscribe connects a client with certificate cn and subscribes to filter
// at QoS 1. With persistent, its session (and queued messages) outlives a
// disconnect or, on a persistent broker, a broker restart.
func subscribe(t testing.TB, b *mosquitto.Broker, cn, filter string, persistent bool) *subscriber {
	t.Helper()
	s := &subscriber{got: make(chan *paho.Publish, 200000)}
	u, _ := url.Parse("mqtts://" + b.Addr)
	tc := b.ClientTLS(b.CA.Client(t, cn))
	subscribed := make(chan struct{}, 1)
	cfg := autopaho.ClientConfig{
		ServerUrls:       []*url.URL{u},
		KeepAlive:        30,
		ReconnectBackoff: autopaho.NewConstantBackoff(20 * time.Millisecond),
		AttemptConnection: func(ctx context.Context, _ autopaho.ClientConfig, u *url.URL) (net.Conn, error) {
			d := tls.Dialer{Config: tc}
			c, err := d.DialContext(ctx, "tcp", u.Host)
			if err != nil {
				return nil, err
			}
			return packets.NewThreadSafeConn(c), nil
		},
		CleanStartOnInitialConnection: !persistent,
		OnConnectionUp: func(cm *autopaho.ConnectionManager, _ *paho.Connack) {
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if _, err := cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}}); err == nil {
					select {
					case subscribed <- struct{}{}:
					default:
					}
				}
			}()
		},
		ClientConfig: paho.ClientConfig{
			ClientID: cn,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
				s.got <- pr.Packet
				return true, nil
			}},
		},
	}
	if persistent {
		cfg.SessionExpiryInterval = 3600
	}
	var err error
	s.cm, err = autopaho.NewConnection(context.Background(), cfg)
	if err != nil {
		t.Fatalf("subscriber: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.cm.Disconnect(ctx)
	})
	select {
	case <-subscribed:
	case <-time.After(10 * time.Second):
		t.Fatalf("subscriber %s: not subscribed to %s within 10s", cn, filter)
	}
	return s
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

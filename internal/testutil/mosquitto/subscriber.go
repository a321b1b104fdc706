package mosquitto

import (
	"context"
	"crypto/tls"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/packets"
	"github.com/eclipse/paho.golang/paho"
)

// Subscriber is the cloud side: an MQTT v5 client on the cloud broker that
// reconnects on its own and hands every message to Got.
type Subscriber struct {
	cm  *autopaho.ConnectionManager
	Got chan *paho.Publish
}

// Subscribe connects cn to b and subscribes to filter at QoS 1. persistent
// keeps its session (and the messages queued for it) across a broker restart.
func Subscribe(tb testing.TB, b *Broker, cn, filter string, persistent bool) *Subscriber {
	tb.Helper()
	s := &Subscriber{Got: make(chan *paho.Publish, 200000)}
	u, _ := url.Parse("mqtts://" + b.Addr)
	tc := b.ClientTLS(b.CA.Client(tb, cn))
	subscribed := make(chan struct{}, 1)
	// The SUBSCRIBE of each connection runs on a goroutine of its own; it
	// ends with the subscriber (cleanup cancels it and waits), not up to 5 s
	// later, after the test, where goleak finds it.
	live, stop := context.WithCancel(context.Background())
	var subscribing sync.WaitGroup
	cfg := autopaho.ClientConfig{
		ServerUrls:       []*url.URL{u},
		KeepAlive:        30,
		ReconnectBackoff: autopaho.NewConstantBackoff(50 * time.Millisecond),
		AttemptConnection: func(ctx context.Context, _ autopaho.ClientConfig, u *url.URL) (net.Conn, error) {
			c, err := (&tls.Dialer{Config: tc}).DialContext(ctx, "tcp", u.Host)
			if err != nil {
				return nil, err
			}
			return packets.NewThreadSafeConn(c), nil
		},
		CleanStartOnInitialConnection: !persistent,
		OnConnectionUp: func(cm *autopaho.ConnectionManager, _ *paho.Connack) {
			subscribing.Add(1)
			go func() {
				defer subscribing.Done()
				ctx, cancel := context.WithTimeout(live, 5*time.Second)
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
				s.Got <- pr.Packet
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
		tb.Fatalf("subscriber: %v", err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		stop()
		s.cm.Disconnect(ctx)
		<-s.cm.Done()
		subscribing.Wait()
	})
	select {
	case <-subscribed:
	case <-time.After(10 * time.Second):
		tb.Fatalf("subscriber %s: not subscribed to %s within 10s", cn, filter)
	}
	return s
}

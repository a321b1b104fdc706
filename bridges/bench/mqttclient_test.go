package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/eclipse/paho.golang/paho"

	"github.com/bastion-iot/bastion/internal/devicesim"
)

// publisher is the load generator's MQTT client.
type publisher interface {
	Publish(ctx context.Context, topic string, qos byte, payload []byte) (byte, error)
	Close() error
}

// packetWrites reports whether the benchmark's MQTT clients write each
// packet in one TLS record (BENCH_MQTT_WRITES=packet) instead of devicesim's
// paho client, which writes a PUBLISH in three Write calls (fixed header,
// topic and properties, payload): three TLS records and three write(2)s per
// message.
//
// Why it matters: with one publisher at QoS 0 on an otherwise idle machine
// the client, not the broker, sets the pace. A broker that keeps up with the
// client leaves the TCP window open, so every one of the client's writes is
// sent as its own segment and crosses both TCP stacks on the client's CPU;
// a broker that lags (Mosquitto, CPU-bound at about 3.7 µs a message) keeps
// the window full, and the client's writes pile up into a few large
// segments that the broker's reads pull through (0.01 segments per message
// against 1–2). The benchmark prints TCP segments and the client's CPU per
// message for both brokers so that this shows. Most MQTT clients (paho.mqtt.c,
// mosquitto_pub, embedded stacks) write a packet with one send.
func packetWrites() bool { return os.Getenv("BENCH_MQTT_WRITES") == "packet" }

// dialPublisher connects d to the broker at addr with the client packetWrites
// chooses.
func dialPublisher(ctx context.Context, d *devicesim.Device, addr string) (publisher, error) {
	if !packetWrites() {
		return d.DialMQTT(ctx, addr, nil)
	}
	cfg, err := d.TLSConfig(addr)
	if err != nil {
		return nil, err
	}
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mqtts connect to %s as %s: %w", addr, d.ID, err)
	}
	pc := &packetConn{Conn: conn}
	c := paho.NewClient(paho.ClientConfig{Conn: pc})
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: d.ID, KeepAlive: 60, CleanStart: true}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("mqtt CONNECT as %s: %w", d.ID, err)
	}
	return &packetClient{c: c, conn: conn}, nil
}

// packetConn gathers what paho writes while it holds the connection's lock
// (paho takes it around each packet when the connection is a sync.Locker)
// and writes it with one Write when paho unlocks: one TLS record per packet.
type packetConn struct {
	net.Conn
	mu   sync.Mutex
	held bool
	buf  []byte
	err  error // of the last flush, returned by the next Write
}

func (c *packetConn) Lock() {
	c.mu.Lock()
	c.held = true
}

func (c *packetConn) Unlock() {
	if len(c.buf) > 0 && c.err == nil {
		if _, err := c.Conn.Write(c.buf); err != nil {
			c.err = err
			c.Conn.Close() // paho's reader sees it and ends the session
		}
	}
	c.buf, c.held = c.buf[:0], false
	c.mu.Unlock()
}

func (c *packetConn) Write(p []byte) (int, error) {
	if !c.held {
		return c.Conn.Write(p) // paho writes every packet under the lock
	}
	if c.err != nil {
		return 0, c.err
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

type packetClient struct {
	c    *paho.Client
	conn net.Conn
}

func (p *packetClient) Publish(ctx context.Context, topic string, qos byte, payload []byte) (byte, error) {
	pr, err := p.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Payload: payload})
	if pr != nil {
		return pr.ReasonCode, err
	}
	return 0, err
}

func (p *packetClient) Close() error {
	err := p.c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	p.conn.Close()
	<-p.c.Done()
	return err
}

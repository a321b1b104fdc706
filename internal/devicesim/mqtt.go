package devicesim

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"

	"github.com/eclipse/paho.golang/paho"
)

// MQTT is a device's MQTT 5 session over TLS.
type MQTT struct {
	c    *paho.Client
	conn net.Conn
	id   string
	mu   sync.Mutex
	err  error
}

func (m *MQTT) setErr(err error) {
	m.mu.Lock()
	if m.err == nil {
		m.err = err
	}
	m.mu.Unlock()
}

// Err is why the session ended, if it did for a reason other than Close.
func (m *MQTT) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

func reasonString(p *paho.DisconnectProperties) string {
	if p == nil {
		return ""
	}
	return p.ReasonString
}

// DialMQTT connects over TLS as the device (client id = device id) and
// calls onMessage for every message the gateway delivers.
func (d *Device) DialMQTT(ctx context.Context, addr string, onMessage func(topic string, payload []byte)) (*MQTT, error) {
	return d.DialMQTTAs(ctx, addr, d.ID, onMessage)
}

// DialMQTTAs is DialMQTT with another client id (tests of the refusal).
func (d *Device) DialMQTTAs(ctx context.Context, addr, clientID string, onMessage func(topic string, payload []byte)) (*MQTT, error) {
	cfg, err := d.TLSConfig(addr)
	if err != nil {
		return nil, err
	}
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mqtts connect to %s as %s: %w", addr, d.ID, err)
	}
	m := &MQTT{conn: conn, id: d.ID}
	cc := paho.ClientConfig{Conn: &lockedConn{Conn: conn, whole: d.PacketWrites},
		OnServerDisconnect: func(dc *paho.Disconnect) {
			m.setErr(fmt.Errorf("server sent DISCONNECT reason 0x%02x %s", dc.ReasonCode, reasonString(dc.Properties)))
		},
		OnClientError: func(err error) { m.setErr(err) },
	}
	if onMessage != nil {
		cc.OnPublishReceived = []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			onMessage(pr.Packet.Topic, pr.Packet.Payload)
			return true, nil
		}}
	}
	c := paho.NewClient(cc)
	cp := &paho.Connect{ClientID: clientID, KeepAlive: 60, CleanStart: true}
	if d.Auth == "secret" {
		cp.Username, cp.UsernameFlag = d.ID, true
		cp.Password, cp.PasswordFlag = []byte(d.Secret), true
	}
	ca, err := c.Connect(ctx, cp)
	if err != nil {
		conn.Close()
		if ca != nil {
			return nil, fmt.Errorf("mqtt CONNECT as %s refused: reason 0x%02x %s", clientID, ca.ReasonCode, ca.Properties.ReasonString)
		}
		return nil, fmt.Errorf("mqtt CONNECT as %s: %w", clientID, err)
	}
	m.c = c
	return m, nil
}

// lockedConn makes every MQTT packet paho writes one uninterrupted
// sequence of writes: paho writes a packet in several Write calls and its
// pinger sends a PINGREQ right after CONNACK from another goroutine, which
// without the lock interleaves with the first PUBLISH (brokers then see a
// malformed packet and drop the connection). paho takes the lock when the
// connection implements sync.Locker.
//
// With whole (Device.PacketWrites) what paho writes under the lock is
// gathered and written with one Write when it unlocks: one TLS record per
// packet instead of paho's several for a PUBLISH.
type lockedConn struct {
	net.Conn
	mu    sync.Mutex
	whole bool
	held  bool
	buf   []byte
	err   error // of the last gathered write, returned by the next Write
}

func (c *lockedConn) Lock() {
	c.mu.Lock()
	c.held = c.whole
}

func (c *lockedConn) Unlock() {
	if c.held {
		if len(c.buf) > 0 && c.err == nil {
			if _, err := c.Conn.Write(c.buf); err != nil {
				c.err = err
				c.Conn.Close() // paho's reader sees it and ends the session
			}
		}
		c.buf, c.held = c.buf[:0], false
	}
	c.mu.Unlock()
}

func (c *lockedConn) Write(p []byte) (int, error) {
	if !c.held {
		return c.Conn.Write(p)
	}
	if c.err != nil {
		return 0, c.err
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// Publish sends a message on topic. A refusal by the gateway is not an
// error: the reason code says it. For QoS 1 the reason code of the PUBACK is returned (0 = accepted,
// 0x97 = gateway queue full, 0x87 = not authorised).
func (m *MQTT) Publish(ctx context.Context, topic string, qos byte, payload []byte) (byte, error) {
	pr, err := m.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Payload: payload})
	if pr != nil && pr.ReasonCode >= 0x80 {
		return pr.ReasonCode, nil // an answer, not a failure: the caller reads the code
	}
	if pr != nil {
		return pr.ReasonCode, err
	}
	return 0, err
}

// PublishRetained publishes a retained QoS 1 message (device status).
func (m *MQTT) PublishRetained(ctx context.Context, topic string, payload []byte) (byte, error) {
	pr, err := m.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Retain: true, Payload: payload})
	if pr != nil {
		return pr.ReasonCode, err
	}
	return 0, err
}

// TelemetryTopic is the topic a device publishes telemetry path on.
func (m *MQTT) TelemetryTopic(path string) string { return "devices/" + m.id + "/t/" + path }

// Subscribe subscribes to filter with QoS 1 and returns the SUBACK reason.
func (m *MQTT) Subscribe(ctx context.Context, filter string) (byte, error) {
	sa, err := m.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if sa != nil && len(sa.Reasons) > 0 {
		return sa.Reasons[0], err
	}
	return 0, err
}

// Done is closed when the session ends.
func (m *MQTT) Done() <-chan struct{} { return m.c.Done() }

// Close disconnects cleanly.
func (m *MQTT) Close() error {
	err := m.c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	m.conn.Close()
	<-m.c.Done()
	return err
}

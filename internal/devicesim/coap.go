package devicesim

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
)

// CoAP is a device's CoAP-over-DTLS session with the gateway.
type CoAP struct {
	cc   *udpclient.Conn
	dc   *piondtls.Conn
	stop context.CancelFunc
}

// DialCoAP does the DTLS handshake with the gateway at addr.
func (d *Device) DialCoAP(ctx context.Context, addr string) (*CoAP, error) {
	cfg, err := d.DTLSConfig(addr)
	if err != nil {
		return nil, err
	}
	return d.dialWith(ctx, addr, cfg)
}

// DialDTLS does the DTLS handshake with the gateway at addr and returns
// the session bare, for callers that write CoAP datagrams themselves (tests
// and benchmarks that keep several requests outstanding).
func (d *Device) DialDTLS(ctx context.Context, addr string) (*piondtls.Conn, error) {
	cfg, err := d.DTLSConfig(addr)
	if err != nil {
		return nil, err
	}
	return d.handshake(ctx, addr, cfg)
}

func (d *Device) handshake(ctx context.Context, addr string, cfg *piondtls.Config) (*piondtls.Conn, error) {
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("coaps %s: %w", addr, err)
	}
	conn, err := piondtls.Dial("udp", raddr, cfg)
	if err != nil {
		return nil, fmt.Errorf("coaps dial %s as %s: %w", addr, d.ID, err)
	}
	if err := conn.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("coaps handshake with %s as %s: %w", addr, d.ID, err)
	}
	return conn, nil
}

// dialWith does the handshake with a given DTLS config (pair.go's
// enrollment sessions use their own); extra go-coap options come last, so
// they override the defaults (firmware sessions turn block-wise off).
func (d *Device) dialWith(ctx context.Context, addr string, cfg *piondtls.Config, extra ...udp.Option) (*CoAP, error) {
	// The handshake is done here, so that a refused one is an error of
	// DialCoAP and not of the first request.
	conn, err := d.handshake(ctx, addr, cfg)
	if err != nil {
		return nil, err
	}
	life, stop := context.WithCancel(context.WithoutCancel(ctx))
	opts := []udp.Option{options.WithContext(life), options.WithMaxMessageSize(128 * 1024),
		// go-coap's default runner sleeps on after the session; this one ends with it.
		options.WithPeriodicRunner(periodic.New(life.Done(), time.Second)),
		options.WithErrors(func(error) {})}
	cc := dtls.Client(conn, append(opts, extra...)...)
	return &CoAP{cc: cc, dc: conn, stop: stop}, nil
}

// Close ends the session.
// Close ends the session and waits until its goroutines are done. The DTLS
// connection is closed here too: go-coap's session close alone leaves its
// reader waiting when the peer is already gone.
func (c *CoAP) Close() error {
	err := c.cc.Close()
	c.dc.Close()
	c.stop()
	<-c.cc.Done()
	return err
}

// Done is closed when the session ends (the gateway closed it, or Close).
func (c *CoAP) Done() <-chan struct{} { return c.cc.Done() }

// Response is a gateway's answer.
type Response struct {
	Code    codes.Code
	Payload []byte
	MaxAge  uint32
}

// Publish POSTs telemetry to /t/{path} (confirmable: acknowledged once the
// gateway accepted it).
func (c *CoAP) Publish(ctx context.Context, path string, payload []byte) (Response, error) {
	return c.PublishQoS(ctx, path, payload, 1)
}

// PublishQoS POSTs telemetry to /t/{path}: with qos 1 as a confirmable
// request (QoS 1 at the gateway: acknowledged once the message is
// durable, retransmitted until then), with qos 0 as a non-confirmable one
// (QoS 0 at the gateway, never retransmitted). The gateway answers a NON
// request too (a NON 2.04 once admitted, or the refusal), and PublishQoS
// waits for that answer; a lost datagram is not sent again, so ctx bounds
// the wait.
func (c *CoAP) PublishQoS(ctx context.Context, path string, payload []byte, qos byte) (Response, error) {
	p := "/t/" + strings.TrimPrefix(path, "/")
	typ := message.Confirmable
	switch qos {
	case 0:
		typ = message.NonConfirmable
	case 1:
	default:
		return Response{}, fmt.Errorf("coap POST %s: QoS %d: CoAP has 0 (non-confirmable) and 1 (confirmable)", p, qos)
	}
	req, err := c.cc.NewPostRequest(ctx, p, message.AppOctets, bytes.NewReader(payload))
	if err != nil {
		return Response{}, fmt.Errorf("coap POST %s: %w", p, err)
	}
	defer c.cc.ReleaseMessage(req)
	// go-coap sends a request confirmable unless its type is set.
	req.SetType(typ)
	resp, err := c.cc.Do(req)
	if err != nil {
		return Response{}, fmt.Errorf("coap POST %s: %w", p, err)
	}
	return toResponse(resp), nil
}

// Do sends an arbitrary request (tests use it for wrong requests). format
// is the Content-Format, or -1 for none.
func (c *CoAP) Do(ctx context.Context, code codes.Code, path string, payload []byte, format int) (Response, error) {
	req, err := c.cc.NewPostRequest(ctx, path, message.AppOctets, bytes.NewReader(payload))
	if err != nil {
		return Response{}, err
	}
	defer c.cc.ReleaseMessage(req)
	req.SetCode(code)
	req.Remove(message.ContentFormat)
	if format >= 0 {
		req.SetContentFormat(message.MediaType(format))
	}
	if payload == nil {
		req.SetBody(nil)
	}
	resp, err := c.cc.Do(req)
	if err != nil {
		return Response{}, err
	}
	return toResponse(resp), nil
}

func toResponse(m *pool.Message) Response {
	r := Response{Code: m.Code()}
	if b := m.Body(); b != nil {
		r.Payload, _ = io.ReadAll(b)
	}
	if v, err := m.Options().GetUint32(message.MaxAge); err == nil {
		r.MaxAge = v
	}
	return r
}

// Observe registers for the commands under /c/{path}; fn gets each command
// payload. The first response (the current command, if any) is not passed
// to fn. cancel deregisters.
func (c *CoAP) Observe(ctx context.Context, path string, fn func(payload []byte)) (cancel func(context.Context) error, err error) {
	first := true
	obs, err := c.cc.Observe(ctx, "/c/"+strings.TrimPrefix(path, "/"), func(m *pool.Message) {
		if first {
			first = false
			return
		}
		var b []byte
		if body := m.Body(); body != nil {
			b, _ = io.ReadAll(body)
		}
		fn(b)
	})
	if err != nil {
		return nil, fmt.Errorf("coap observe /c/%s: %w", path, err)
	}
	return func(ctx context.Context) error { return obs.Cancel(ctx) }, nil
}

// Ping checks the session is alive.
func (c *CoAP) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.cc.Ping(ctx)
}

package devicesim

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/options/config"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"
)

// CoAP is a device's CoAP-over-DTLS session with the gateway.
type CoAP struct {
	cc   *udpclient.Conn
	dc   *piondtls.Conn
	stop context.CancelFunc

	// watch: observations by token, shown every message of theirs as it
	// arrives (received), before go-coap drops stale notifications.
	wmu   sync.Mutex
	watch map[string]*Observation
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
	c := &CoAP{dc: conn, stop: stop}
	opts := []udp.Option{options.WithContext(life), options.WithMaxMessageSize(128 * 1024),
		// go-coap's default runner sleeps on after the session; this one ends with it.
		options.WithPeriodicRunner(periodic.New(life.Done(), time.Second)),
		options.WithErrors(func(error) {}),
		options.WithProcessReceivedMessageFunc(func(req *pool.Message, cc *udpclient.Conn, h config.HandlerFunc[*udpclient.Conn]) {
			c.received(req)
			cc.ProcessReceivedMessageWithHandler(req, h)
		})}
	c.cc = dtls.Client(conn, append(opts, extra...)...)
	return c, nil
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

// Notification is one message of an observation.
type Notification struct {
	Payload []byte
	Seq     uint32 // the Observe option's value
}

// Observation is a registration for commands (ObserveCommands).
type Observation struct {
	// First is the registration answer: the command in force when the
	// device registered (an empty payload: none) and its Observe number.
	First Notification

	obs interface {
		Cancel(context.Context, ...message.Option) error
	}
	path string

	mu       sync.Mutex
	seen     bool   // a message of the observation arrived
	last     uint32 // its Observe number
	lastMID  int32
	err      error
	answered chan error // the registration answer as go-coap passed it on
}

// Err is the first violation of RFC 7641 the observation saw, or nil: a
// notification that came before the registration answer, one without an
// Observe option, or an Observe number not newer than the one before
// (§3.4). They are checked on every datagram as it arrives, before
// go-coap silently drops a notification it finds stale.
func (o *Observation) Err() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.err
}

// Cancel deregisters. It returns Err joined with the deregistration's own
// error, so a caller that cancels sees any violation.
func (o *Observation) Cancel(ctx context.Context) error {
	return errors.Join(o.Err(), o.obs.Cancel(ctx))
}

// check records a violation in m, a message of the observation just read.
func (o *Observation) check(m *pool.Message) {
	seq, err := m.Observe()
	o.mu.Lock()
	defer o.mu.Unlock()
	first := !o.seen
	o.seen = true
	var bad error
	switch {
	case first && m.Type() != message.Acknowledgement:
		bad = fmt.Errorf("coap observe %s: a %v message (Observe %d) came before the registration answer", o.path, m.Type(), seq)
	case err != nil && !first:
		bad = fmt.Errorf("coap observe %s: notification without an Observe option", o.path)
	case err != nil:
		return // the answer says "not registered": ObserveCommands fails
	case !first && m.MessageID() == o.lastMID && seq == o.last:
		return // a duplicate datagram
	case !first && !newer(o.last, seq):
		bad = fmt.Errorf("coap observe %s: Observe numbers went backwards: %d after %d", o.path, seq, o.last)
	}
	if bad != nil && o.err == nil {
		o.err = bad
	}
	o.last, o.lastMID = seq, m.MessageID()
}

// received shows m to the observation its token belongs to, if any.
func (c *CoAP) received(m *pool.Message) {
	c.wmu.Lock()
	o := c.watch[string(m.Token())]
	c.wmu.Unlock()
	if o != nil {
		o.check(m)
	}
}

// newer reports whether Observe number v2 is fresher than v1 (RFC 7641
// §3.4, 24-bit serial numbers; the 128 s rule is not applied: a device
// simulator checks the gateway's numbering, not the network's delay).
func newer(v1, v2 uint32) bool {
	return (v1 < v2 && v2-v1 < 1<<23) || (v1 > v2 && v1-v2 > 1<<23)
}

// ObserveCommands registers for the commands under /c/{path} and returns
// once the registration answer has arrived (in Observation.First); fn gets
// every later notification that go-coap passes on (newer than the last).
// The registration answer must be the first message of the observation
// and carry an Observe option, and every notification after it a higher
// Observe number: a violation is recorded (Observation.Err, and Cancel's
// error). An answer without Observe (the gateway did not register) is an
// error here.
func (c *CoAP) ObserveCommands(ctx context.Context, path string, fn func(Notification)) (*Observation, error) {
	p := "/c/" + strings.TrimPrefix(path, "/")
	req, err := c.cc.NewObserveRequest(ctx, p)
	if err != nil {
		return nil, fmt.Errorf("coap observe %s: %w", p, err)
	}
	defer c.cc.ReleaseMessage(req)
	o := &Observation{path: p, answered: make(chan error, 1)}
	tok := string(req.Token())
	c.wmu.Lock()
	if c.watch == nil {
		c.watch = map[string]*Observation{}
	}
	c.watch[tok] = o
	c.wmu.Unlock()
	gotFirst := false
	obs, err := c.cc.DoObserve(req, func(m *pool.Message) {
		var b []byte
		if body := m.Body(); body != nil {
			b, _ = io.ReadAll(body)
		}
		seq, serr := m.Observe()
		if !gotFirst {
			// go-coap takes the first message with the token as the
			// answer, whatever it is (check flags one that is not).
			gotFirst = true
			o.First = Notification{Payload: b, Seq: seq}
			if serr != nil {
				o.answered <- fmt.Errorf("coap observe %s: the gateway answered %v without an Observe option: not registered", p, m.Code())
			}
			close(o.answered)
			return
		}
		if serr == nil {
			fn(Notification{Payload: b, Seq: seq})
		}
	})
	unwatch := func() {
		c.wmu.Lock()
		delete(c.watch, tok)
		c.wmu.Unlock()
	}
	if err != nil {
		unwatch()
		return nil, fmt.Errorf("coap observe %s: %w", p, err)
	}
	o.obs = cancelWith{obs, unwatch}
	select {
	case err := <-o.answered:
		if err != nil {
			_ = o.obs.Cancel(ctx)
			return nil, err
		}
	case <-ctx.Done():
		_ = o.obs.Cancel(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("coap observe %s: no registration answer: %w", p, ctx.Err())
	}
	return o, nil
}

// cancelWith is a go-coap observation whose Cancel also runs done.
type cancelWith struct {
	obs interface {
		Cancel(context.Context, ...message.Option) error
	}
	done func()
}

func (c cancelWith) Cancel(ctx context.Context, opts ...message.Option) error {
	defer c.done()
	return c.obs.Cancel(ctx, opts...)
}

// Observe registers for the commands under /c/{path}; fn gets each command
// payload notified after the registration answer (which is not passed to
// fn: use ObserveCommands for it and the Observe numbers). cancel
// deregisters and returns any violation of the Observe rules the
// observation saw (see ObserveCommands).
func (c *CoAP) Observe(ctx context.Context, path string, fn func(payload []byte)) (cancel func(context.Context) error, err error) {
	o, err := c.ObserveCommands(ctx, path, func(n Notification) { fn(n.Payload) })
	if err != nil {
		return nil, err
	}
	return o.Cancel, nil
}

// Ping checks the session is alive.
func (c *CoAP) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.cc.Ping(ctx)
}

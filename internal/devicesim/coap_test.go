package devicesim

import (
	"bytes"
	"context"
	"encoding/hex"
	"net"
	"strings"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/pki"
)

// step is one datagram a scripted gateway sends in answer to an observe
// registration: the answer (ack) or a notification, with an Observe
// number (seq < 0: no Observe option) and a payload.
type step struct {
	ack     bool
	seq     int64
	payload string
}

// scriptedGateway answers the first request of one DTLS PSK session with
// the steps, then keeps reading (the deregistration) until the session
// ends. It returns the device and the address.
func scriptedGateway(t *testing.T, steps []step) (*Device, string) {
	t.Helper()
	key := []byte("0123456789abcdef")
	ln, err := piondtls.ListenWithOptions("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)},
		piondtls.WithCipherSuites(pki.DTLSPSKSuites...),
		piondtls.WithPSK(func([]byte) ([]byte, error) { return key, nil }),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 2048)
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		req := pool.NewMessage(context.Background())
		if _, err := req.UnmarshalWithDecoder(coder.DefaultCoder, buf[:n]); err != nil {
			t.Errorf("scripted gateway: request does not decode: %v", err)
			return
		}
		for i, s := range steps {
			m := pool.NewMessage(context.Background())
			m.SetCode(codes.Content)
			m.SetToken(req.Token())
			if s.ack {
				m.SetType(message.Acknowledgement)
				m.SetMessageID(req.MessageID())
			} else {
				m.SetType(message.NonConfirmable)
				m.SetMessageID(int32(1000 + i))
			}
			if s.seq >= 0 {
				m.SetObserve(uint32(s.seq))
			}
			m.SetContentFormat(message.AppOctets)
			m.SetBody(bytes.NewReader([]byte(s.payload)))
			raw, err := m.MarshalWithEncoder(coder.DefaultCoder)
			if err != nil {
				t.Errorf("scripted gateway: %v", err)
				return
			}
			if _, err := c.Write(raw); err != nil {
				return
			}
		}
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	d := &Device{Creds: Creds{ID: "dev", Auth: "psk", PSKIdentity: "dev", PSK: hex.EncodeToString(key)}}
	return d, ln.Addr().String()
}

// observeScript registers against a scripted gateway, collects
// notifications until want of them arrived or the gateway is quiet for
// 300 ms, and returns the observation and what fn got.
func observeScript(t *testing.T, steps []step, want int) (*Observation, []Notification, error) {
	t.Helper()
	d, addr := scriptedGateway(t, steps)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.DialCoAP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make(chan Notification, 16)
	o, err := c.ObserveCommands(ctx, "x", func(n Notification) { got <- n })
	if err != nil {
		return nil, nil, err
	}
	var ns []Notification
	for len(ns) < want {
		select {
		case n := <-got:
			ns = append(ns, n)
		case <-time.After(300 * time.Millisecond):
			want = len(ns)
		}
	}
	cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
	defer ccancel()
	cerr := o.Cancel(cctx)
	return o, ns, cerr
}

// ObserveCommands returns the registration answer with its Observe number
// (the old Observe dropped it unseen) and passes later notifications on.
func TestObserveCommandsPassesAnswer(t *testing.T) {
	o, ns, err := observeScript(t, []step{{ack: true, seq: 5, payload: "A"}, {seq: 6, payload: "B"}, {seq: 7, payload: "C"}}, 2)
	if o == nil {
		t.Fatalf("ObserveCommands: %v", err)
	}
	if o.Err() != nil {
		t.Errorf("Err = %v, want nil", o.Err())
	}
	if string(o.First.Payload) != "A" || o.First.Seq != 5 {
		t.Errorf("First = %q Observe %d, want \"A\" Observe 5", o.First.Payload, o.First.Seq)
	}
	if len(ns) != 2 || string(ns[0].Payload) != "B" || ns[1].Seq != 7 {
		t.Errorf("notifications %+v, want B (6) and C (7)", ns)
	}
}

// Every violation of the gateway's Observe numbering is an error to the
// caller (Err and Cancel), not hidden. Mutations that fail it: check not
// called from received (go-coap alone drops the stale C and takes B as
// the answer silently), or each case of Observation.check removed.
func TestObserveCommandsFailsLoudly(t *testing.T) {
	cases := map[string]struct {
		steps []step
		want  string
	}{
		"notification before the answer": {[]step{{seq: 6, payload: "B"}, {ack: true, seq: 5, payload: "A"}}, "before the registration answer"},
		"numbers go backwards":           {[]step{{ack: true, seq: 5, payload: "A"}, {seq: 7, payload: "B"}, {seq: 6, payload: "C"}}, "went backwards: 6 after 7"},
		"number repeated":                {[]step{{ack: true, seq: 5, payload: "A"}, {seq: 5, payload: "B"}}, "went backwards: 5 after 5"},
		"notification without Observe":   {[]step{{ack: true, seq: 5, payload: "A"}, {seq: -1, payload: "B"}}, "without an Observe option"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			o, _, err := observeScript(t, tc.steps, len(tc.steps))
			if o == nil {
				t.Fatalf("ObserveCommands: %v", err)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Cancel: %v, want an error containing %q", err, tc.want)
			}
			if o.Err() == nil {
				t.Error("Err() = nil")
			}
		})
	}
}

// An answer without Observe (the gateway did not register) is an error of
// ObserveCommands itself.
func TestObserveCommandsNotRegistered(t *testing.T) {
	_, _, err := observeScript(t, []step{{ack: true, seq: -1, payload: "A"}}, 0)
	if err == nil || !strings.Contains(err.Error(), "not registered") {
		t.Fatalf("ObserveCommands: %v, want \"not registered\"", err)
	}
}

package otacache

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/udp/coder"
)

// recordConn stands for the DTLS connection: it keeps what the server
// writes (the fuzz target needs no handshake to reach the CoAP layer).
type recordConn struct {
	net.Conn
	out [][]byte
}

func (c *recordConn) Write(b []byte) (int, error) {
	c.out = append(c.out, append([]byte(nil), b...))
	return len(b), nil
}
func (c *recordConn) RemoteAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5684}
}
func (c *recordConn) Close() error { return nil }

// FuzzServeDatagram feeds decrypted datagrams from a device (seeded with
// libcoap coap-client captures and go-coap encodings) to the CoAP
// layer of ServeDTLS (decode, dedup, Block1 reassembly with a body limit
// per path, Block2 cutting, and the 4.13 for a datagram too large to
// read): it must not panic, must answer a datagram at most once, and
// everything it sends must decode as CoAP.
func FuzzServeDatagram(f *testing.F) {
	enc := func(m message.Message) []byte {
		b := make([]byte, 2048)
		n, err := coder.DefaultCoder.Encode(m, b)
		if err != nil {
			f.Fatal(err)
		}
		return b[:n]
	}
	path := func(p string, o ...message.Option) message.Options {
		opts := message.Options{{ID: message.URIPath, Value: []byte(p)}}
		for _, x := range o {
			opts = opts.Add(x)
		}
		return opts
	}
	blk := func(id message.OptionID, num int64, more bool) message.Option {
		v, _ := blockwise.EncodeBlockOption(blockwise.SZX16, num, more)
		b := make([]byte, 4)
		return message.Option{ID: id, Value: b[:putUint(b, v)]}
	}
	f.Add(enc(message.Message{Type: message.Confirmable, Code: codes.Empty, MessageID: 1}))
	f.Add(enc(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 2, Token: []byte("t"), Options: path("big", blk(message.Block2, 3, false))}))
	f.Add(enc(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 3, Token: []byte("u"), Options: path("up", blk(message.Block1, 0, true)), Payload: []byte("0123456789abcdef")}))
	f.Add(enc(message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 4, Options: path("t", message.Option{ID: message.NoResponse, Value: []byte{2}}), Payload: []byte("21.5")}))
	f.Add([]byte{0x49, 0x01, 0x00, 0x08})
	// Real devices' datagrams: libcoap's coap-client (GET, POST with
	// Block1, NON, Observe, DELETE...), captured for bridges/coap.
	captures, _ := filepath.Glob("../bridges/coap/testdata/captures/*.bin")
	if len(captures) == 0 {
		f.Fatal("no seed captures in ../bridges/coap/testdata/captures")
	}
	for _, p := range captures {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := &DTLSServeConfig{MaxMessageSize: 64, BlockwiseSZX: blockwise.SZX1024, Errors: func(error) {}, ReadBufferSize: 1472,
			BodyLimit: func(_ *DTLSConn, p string) uint32 {
				if p == "/up" {
					return 20
				}
				return 0
			},
			Handler: func(w *DTLSResponseWriter, r *pool.Message) {
				if p, _ := r.Path(); p == "/big" {
					_ = w.SetResponse(codes.Content, message.AppOctets, bytes.NewReader(bigBody))
					return
				}
				body, _ := r.ReadBody()
				_ = w.SetResponse(codes.Changed, message.TextPlain, strings.NewReader(string(body)))
			}}
		rc := &recordConn{}
		c := &DTLSConn{nc: rc, ctx: context.Background(), srv: &dtlsServer{cfg: cfg}, cache: NewResponseCache(4)}
		// Twice: the second time is a duplicate (or the next Block1 block).
		for range 2 {
			before := len(rc.out)
			c.handleDatagram(data, time.Now())
			if n := len(rc.out) - before; n > 1 {
				t.Fatalf("one datagram answered %d times", n)
			}
		}
		before := len(rc.out)
		c.refuseDatagram(data, time.Now())
		if n := len(rc.out) - before; n > 1 {
			t.Fatalf("one datagram too large to read answered %d times", n)
		}
		for _, out := range rc.out {
			m := message.Message{Options: make(message.Options, 0, 16)}
			if _, err := coder.DefaultCoder.Decode(out, &m); err != nil {
				t.Fatalf("server sent %x, which does not decode: %v", out, err)
			}
		}
	})
}

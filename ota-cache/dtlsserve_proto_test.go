package otacache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os/exec"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/message/pool"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/udp/coder"

	"github.com/bastion-iot/bastion/internal/testenv"
)

// protoServer runs ServeDTLS with a handler that answers GET /big with a
// 100-byte body and any other request with the SHA-256 of its body (hex),
// recording the bodies it saw.
type protoServer struct {
	addr   string
	mu     sync.Mutex
	bodies []string
}

func (p *protoServer) seen() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.bodies...)
}

var bigBody = func() []byte {
	b := make([]byte, 100)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}()

func startProtoServer(t *testing.T, maxBody uint32) *protoServer {
	t.Helper()
	l := testPSKListener(t)
	p := &protoServer{addr: l.Addr().String()}
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		if path, _ := r.Path(); path == "/big" {
			_ = w.SetResponse(codes.Content, message.AppOctets, bytes.NewReader(bigBody))
			return
		}
		body, _ := r.ReadBody()
		p.mu.Lock()
		p.bodies = append(p.bodies, string(body))
		p.mu.Unlock()
		sum := sha256.Sum256(body)
		_ = w.SetResponse(codes.Changed, message.TextPlain, strings.NewReader(hex.EncodeToString(sum[:])))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ServeDTLS(ctx, l, DTLSServeConfig{Handler: h, MaxMessageSize: maxBody})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

// rawDevice is a real DTLS-PSK session that writes hand-made CoAP
// messages, to see exactly what the server answers.
type rawDevice struct {
	t  *testing.T
	dc *piondtls.Conn
}

func dialRaw(t *testing.T, addr string) *rawDevice {
	t.Helper()
	cfg := pskConfig(func(string) ([]byte, bool) { return []byte(testPSKs["dev-a"]), true })
	cfg.PSKIdentityHint = []byte("dev-a")
	raddr, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := piondtls.Dial("udp", raddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	return &rawDevice{t: t, dc: dc}
}

func (d *rawDevice) send(m message.Message) {
	d.t.Helper()
	buf := make([]byte, 2048)
	n, err := coder.DefaultCoder.Encode(m, buf)
	if err != nil {
		d.t.Fatal(err)
	}
	d.sendRaw(buf[:n])
}

func (d *rawDevice) sendRaw(b []byte) {
	d.t.Helper()
	if _, err := d.dc.Write(b); err != nil {
		d.t.Fatal(err)
	}
}

// recv returns the next message from the server (fails after 5 s).
func (d *rawDevice) recv() message.Message {
	d.t.Helper()
	buf := make([]byte, 2048)
	d.dc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := d.dc.Read(buf)
	if err != nil {
		d.t.Fatalf("no answer: %v", err)
	}
	m := message.Message{Options: make(message.Options, 0, 16)}
	if _, err := coder.DefaultCoder.Decode(buf[:n], &m); err != nil {
		d.t.Fatalf("answer %x does not decode: %v", buf[:n], err)
	}
	m.Payload = append([]byte(nil), m.Payload...)
	return m
}

// summary is what the tests compare of an answer.
type summary struct {
	Type    message.Type
	Code    codes.Code
	MID     int32
	Token   string
	Payload string
	Block   string // "num/more/size" of Block1 or Block2, if any
	Size    uint32 // Size1 or Size2
}

func summarize(m message.Message, mid bool) summary {
	s := summary{Type: m.Type, Code: m.Code, Token: string(m.Token), Payload: string(m.Payload)}
	if mid {
		s.MID = m.MessageID
	}
	for _, id := range []message.OptionID{message.Block1, message.Block2} {
		if v, err := m.Options.GetUint32(id); err == nil {
			szx, num, more, _ := blockwise.DecodeBlockOption(v)
			s.Block = fmt.Sprintf("%d/%v/%d", num, more, szx.Size())
		}
	}
	for _, id := range []message.OptionID{message.Size1, message.Size2} {
		if v, err := m.Options.GetUint32(id); err == nil {
			s.Size = v
		}
	}
	return s
}

func uintOpt(id message.OptionID, v uint32) message.Option {
	b := make([]byte, 4)
	return message.Option{ID: id, Value: b[:putUint(b, v)]}
}

func blockOpt(t *testing.T, id message.OptionID, num int64, more bool, szx blockwise.SZX) message.Option {
	v, err := blockwise.EncodeBlockOption(szx, num, more)
	if err != nil {
		t.Fatal(err)
	}
	return uintOpt(id, v)
}

// pathOpts builds sorted options (the encoder needs them in order).
func pathOpts(p string, more ...message.Option) message.Options {
	o := message.Options{{ID: message.URIPath, Value: []byte(p)}}
	for _, m := range more {
		o = o.Add(m)
	}
	return o
}

func sumHex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestServeDTLSProtocol(t *testing.T) {
	p := startProtoServer(t, 40)
	d := dialRaw(t, p.addr)
	ask := func(m message.Message, wantMID bool) summary {
		t.Helper()
		d.send(m)
		return summarize(d.recv(), wantMID)
	}
	check := func(name string, want, got summary) {
		t.Helper()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", name, diff)
		}
	}

	// An empty CON is a ping: RST with its message ID.
	check("ping", summary{Type: message.Reset, Code: codes.Empty, MID: 7},
		ask(message.Message{Type: message.Confirmable, Code: codes.Empty, MessageID: 7}, true))

	// A malformed CON whose header parses (token length 9 is reserved): RST.
	d.sendRaw([]byte{0x49, byte(codes.GET), 0x00, 0x08})
	check("malformed CON", summary{Type: message.Reset, Code: codes.Empty, MID: 8}, summarize(d.recv(), true))

	// Block2: the asked block of a 100-byte body, with Size2; past the end 4.02.
	check("block 1 of 16", summary{Type: message.Acknowledgement, Code: codes.Content, MID: 9, Token: "b", Payload: string(bigBody[16:32]), Block: "1/true/16", Size: 100},
		ask(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 9, Token: []byte("b"),
			Options: pathOpts("big", blockOpt(t, message.Block2, 1, false, blockwise.SZX16))}, true))
	check("last block", summary{Type: message.Acknowledgement, Code: codes.Content, MID: 10, Token: "b", Payload: string(bigBody[96:]), Block: "6/false/16", Size: 100},
		ask(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 10, Token: []byte("b"),
			Options: pathOpts("big", blockOpt(t, message.Block2, 6, false, blockwise.SZX16))}, true))
	got := ask(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 11, Token: []byte("b"),
		Options: pathOpts("big", blockOpt(t, message.Block2, 7, false, blockwise.SZX16))}, true)
	if got.Code != codes.BadOption || got.MID != 11 {
		t.Errorf("block past the end: %+v, want 4.02 on MID 11", got)
	}
	// Small bodies without Block2 come whole.
	check("whole body", summary{Type: message.Acknowledgement, Code: codes.Content, MID: 12, Token: "w", Payload: string(bigBody)},
		ask(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: 12, Token: []byte("w"), Options: pathOpts("big")}, true))

	// Block1: three 16-byte blocks with a new token each (as libcoap
	// sends them) and one Request-Tag are put back together.
	tag := message.Option{ID: message.RequestTag, Value: []byte{1, 2}}
	body := []byte("0123456789abcdef0123456789ABCDEFxyz")
	for i := range 3 {
		end := min(len(body), (i+1)*16)
		m := message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: int32(20 + i), Token: []byte{byte('t' + i)},
			Options: pathOpts("up", tag, blockOpt(t, message.Block1, int64(i), i < 2, blockwise.SZX16)), Payload: body[i*16 : end]}
		want := summary{Type: message.Acknowledgement, Code: codes.Continue, MID: int32(20 + i), Token: string(m.Token), Block: fmt.Sprintf("%d/true/16", i)}
		if i == 2 {
			want.Code, want.Payload, want.Block = codes.Changed, sumHex(body), "2/false/16"
		}
		check(fmt.Sprintf("Block1 %d", i), want, ask(m, true))
	}
	if diff := cmp.Diff([]string{string(body)}, p.seen()); diff != "" {
		t.Errorf("handler bodies after Block1 (-want +got):\n%s", diff)
	}
	// A block out of order: 4.08; a body over MaxMessageSize (40): 4.13 + Size1.
	got = ask(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 30, Token: []byte("o"),
		Options: pathOpts("up", blockOpt(t, message.Block1, 2, true, blockwise.SZX16)), Payload: body[:16]}, true)
	if got.Code != codes.RequestEntityIncomplete {
		t.Errorf("Block1 out of order: %v, want 4.08", got.Code)
	}
	for i := range 3 {
		got = ask(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: int32(31 + i), Token: []byte("l"),
			Options: pathOpts("up", blockOpt(t, message.Block1, int64(i), true, blockwise.SZX16)), Payload: body[:16]}, true)
	}
	if got.Code != codes.RequestEntityTooLarge || got.Size != 40 {
		t.Errorf("Block1 body over 40 bytes: %v Size1 %d, want 4.13 with Size1 40", got.Code, got.Size)
	}

	// NON: answered NON with a new message ID and the token; the same NON
	// again is answered from the cache, not handled twice.
	non := message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 40, Token: []byte("n"), Options: pathOpts("up"), Payload: []byte("once")}
	d.send(non)
	r1 := d.recv()
	d.send(non)
	r2 := d.recv()
	if r1.Type != message.NonConfirmable || r1.MessageID == 40 || string(r1.Token) != "n" || string(r1.Payload) != sumHex([]byte("once")) {
		t.Errorf("NON answer %v", r1)
	}
	if r2.MessageID != r1.MessageID || !bytes.Equal(r2.Payload, r1.Payload) {
		t.Errorf("repeated NON answered %v, want the cached %v", r2, r1)
	}
	// No-Response 2 (RFC 7967: not interested in 2.xx) on a NON: nothing
	// comes back; the next request's answer is the first to arrive.
	d.send(message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 41, Token: []byte("q"),
		Options: pathOpts("up", uintOpt(message.NoResponse, 2)), Payload: []byte("quiet")})
	check("after No-Response", summary{Type: message.Acknowledgement, Code: codes.Changed, MID: 42, Token: "z", Payload: sumHex([]byte("loud"))},
		ask(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 42, Token: []byte("z"), Options: pathOpts("up"), Payload: []byte("loud")}, true))
	// A datagram larger than the read buffer (1472 bytes) is not handled:
	// a CON gets 4.13 with Size1 (the body limit, here MaxMessageSize), a
	// NON nothing, and the session goes on.
	got = ask(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 43, Token: []byte("h"), Options: pathOpts("up"), Payload: bytes.Repeat([]byte("h"), 1800)}, true)
	if got.Code != codes.RequestEntityTooLarge || got.MID != 43 || got.Token != "h" || got.Size != 40 {
		t.Errorf("oversized CON datagram: %+v, want 4.13 with Size1 40 on MID 43", got)
	}
	d.send(message.Message{Type: message.NonConfirmable, Code: codes.POST, MessageID: 45, Token: []byte("g"), Options: pathOpts("up"), Payload: bytes.Repeat([]byte("g"), 1800)})
	check("after an oversized datagram", summary{Type: message.Acknowledgement, Code: codes.Changed, MID: 44, Token: "k", Payload: sumHex([]byte("still"))},
		ask(message.Message{Type: message.Confirmable, Code: codes.POST, MessageID: 44, Token: []byte("k"), Options: pathOpts("up"), Payload: []byte("still")}, true))
	if diff := cmp.Diff([]string{string(body), "once", "quiet", "loud", "still"}, p.seen()); diff != "" {
		t.Errorf("handler bodies (-want +got):\n%s", diff)
	}
}

// TestServeDTLSLibcoapBlock1 uploads a body larger than one block with
// libcoap's coap-client (Block1, new token per block, Request-Tag): the
// handler sees it whole and its hash comes back.
func TestServeDTLSLibcoapBlock1(t *testing.T) {
	client := testenv.RequireCommand(t, "coap-client-openssl")
	p := startProtoServer(t, 64*1024)
	body := strings.Repeat("firmware-status-", 200) // 3200 bytes: 4 blocks of 1024
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, client, "-B", "10", "-u", "dev-a", "-k", testPSKs["dev-a"], "-m", "post", "-b", "1024",
		"-e", body, "coaps://"+p.addr+"/up").CombinedOutput()
	if err != nil {
		t.Fatalf("coap-client: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), sumHex([]byte(body))) {
		t.Errorf("coap-client output lacks the body's hash %s:\n%s", sumHex([]byte(body)), out)
	}
	if diff := cmp.Diff([]string{body}, p.seen()); diff != "" {
		t.Errorf("handler bodies (-want +got):\n%s", diff)
	}
}

// TestServeDTLSIdleTimeout: a session that sends nothing for IdleTimeout
// is closed (OnIdle, then the AddOnClose functions run); one that keeps
// sending is not.
func TestServeDTLSIdleTimeout(t *testing.T) {
	l := testPSKListener(t)
	const idle = 400 * time.Millisecond
	idled := make(chan time.Time, 4)
	closed := make(chan struct{}, 4)
	h := func(w *DTLSResponseWriter, r *pool.Message) {
		_ = w.SetResponse(codes.Content, message.TextPlain, strings.NewReader("ok"))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ServeDTLS(ctx, l, DTLSServeConfig{Handler: h, IdleTimeout: idle,
			OnIdle:    func(*DTLSConn) { idled <- time.Now() },
			OnNewConn: func(c *DTLSConn) { c.AddOnClose(func() { closed <- struct{}{} }) }})
	}()
	defer func() { cancel(); <-done }()

	get := func(d *rawDevice, mid int32) {
		t.Helper()
		d.send(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: mid, Token: []byte("i"), Options: pathOpts("x")})
		if m := d.recv(); m.Code != codes.Content {
			t.Fatalf("answer %v, want 2.05", m.Code)
		}
	}
	// Busy: a request every idle/4 for 3 idle periods keeps the session.
	busy := dialRaw(t, l.Addr().String())
	tk := time.NewTicker(idle / 4)
	for i := range 12 {
		get(busy, int32(100+i))
		<-tk.C
	}
	tk.Stop()
	select {
	case at := <-idled:
		t.Fatalf("busy session closed as idle at %v", at)
	default:
	}
	// Silent from now on: closed after idle (and at most idle + 1/8).
	last := time.Now()
	get(busy, 200)
	select {
	case at := <-idled:
		if gap := at.Sub(last); gap < idle || gap > 3*idle {
			t.Errorf("closed %v after the last request, want about %v", gap, idle)
		}
	case <-time.After(10 * idle):
		t.Fatal("idle session not closed")
	}
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("AddOnClose functions did not run after the idle close")
	}
	busy.dc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := busy.dc.Read(make([]byte, 64)); err == nil {
		t.Error("idle-closed session still delivers data")
	}
}

// TestServeDTLSSessionGoroutines: an established session has no goroutine
// of ServeDTLS and no handshake goroutine of pion; what is left is pion's
// record reader, which answers (bridges/bench's 10,000 idle devices need
// this to stay under 256 MiB).
func TestServeDTLSSessionGoroutines(t *testing.T) {
	p := startProtoServer(t, 1024)
	const n = 20
	devs := make([]*rawDevice, n)
	for i := range devs {
		devs[i] = dialRaw(t, p.addr)
		devs[i].send(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: int32(i), Token: []byte("g"), Options: pathOpts("big")})
		if m := devs[i].recv(); m.Code != codes.Content {
			t.Fatalf("device %d: answer %v, want 2.05", i, m.Code)
		}
	}
	var dump string
	count := func(frame string) int { return strings.Count(dump, frame) }
	// Handshake goroutines, and the server's part of the session start,
	// end just after the client's handshake has: wait, bounded.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var b bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&b, 2) // one stack per goroutine
		dump = b.String()
		if count("(*handshakeFSM).Run")+count("(*dtlsServer).serveConn") == 0 || time.Now().After(deadline) {
			break
		}
	}
	if got := count("(*dtlsServer).serveConn"); got != 0 {
		t.Errorf("%d goroutines in serveConn with %d established sessions, want 0", got, n)
	}
	if got := count("(*handshakeFSM).Run"); got != 0 {
		t.Errorf("%d handshake goroutines with %d established sessions (and their clients), want 0", got, n)
	}
	// One record reader per connection: n servers and n clients.
	if got := count("(*Conn).readRecords("); got != 2*n {
		t.Errorf("%d pion record readers, want %d (one per connection, both ends)", got, 2*n)
	}
	// Sessions still answer.
	for i, d := range devs {
		d.send(message.Message{Type: message.Confirmable, Code: codes.GET, MessageID: int32(100 + i), Token: []byte("h"), Options: pathOpts("big")})
		if m := d.recv(); m.Code != codes.Content {
			t.Fatalf("device %d: answer %v, want 2.05", i, m.Code)
		}
	}
}

package otacache

import (
	"context"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/pool"
)

// pipeListener hands out the server ends of in-memory connections (no
// DTLS: serveConn skips the handshake for a conn without one).
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
}

func (l *pipeListener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (l *pipeListener) Close() error {
	select {
	case <-l.closed:
	default:
		close(l.closed)
	}
	return nil
}

// pipeSession is the server end of an in-memory connection with pion's
// SetReadHandler: a goroutine reads and hands over what it read.
type pipeSession struct{ net.Conn }

func (p pipeSession) SetReadHandler(h func([]byte, error)) error {
	go func() {
		b := make([]byte, 1500)
		for {
			n, err := p.Read(b)
			if err != nil {
				h(nil, io.EOF)
				return
			}
			h(append([]byte(nil), b[:n]...), nil)
		}
	}()
	return nil
}

// acceptCounter is a pipeListener that reports each entry into Accept, so
// that a test can wait for a worker to be back waiting.
type acceptCounter struct {
	*pipeListener
	entered chan struct{}
}

func (l acceptCounter) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	l.entered <- struct{}{}
	return l.pipeListener.AcceptWithContext(ctx)
}

// Sessions one after another are served by the goroutines the first one
// started (its own and the one it started to wait in Accept meanwhile),
// not by a new goroutine each (whose stack would grow again). The test
// waits for the worker that served a session to be back in Accept before
// the next connection arrives: otherwise the worker waiting there takes
// it, finds itself the last one waiting and rightly starts another so
// that one always waits (a third goroutine under load, once in about 100
// runs). Only a worker that never came back would start one per session.
func TestServeDTLSReusesSessionGoroutines(t *testing.T) {
	opened, ended := make(chan struct{}, 1), make(chan struct{}, 1)
	cfg := &DTLSServeConfig{
		Handler:     func(*DTLSResponseWriter, *pool.Message) {},
		IdleTimeout: time.Minute, ReadBufferSize: 1472, ResponseCacheEntries: 1,
		Errors: func(error) {},
		OnNewConn: func(c *DTLSConn) {
			c.AddOnClose(func() { ended <- struct{}{} })
			opened <- struct{}{}
		},
	}
	srv := newDTLSServer(cfg)
	const sessions = 10
	// Every entry into Accept fits: the first worker's, then per session
	// at most a started one's and the serving one's return.
	l := acceptCounter{&pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}, make(chan struct{}, 2*sessions+1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.serve(ctx, l) }()
	wait := func(c chan struct{}, what string) {
		t.Helper()
		select {
		case <-c:
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s within 10 s", what)
		}
	}
	wait(l.entered, "worker in Accept")
	for i := range sessions {
		client, server := net.Pipe()
		l.conns <- pipeSession{server}
		wait(opened, "session opened")
		client.Close()
		wait(ended, "session ended")
		// Each worker that entered Accept before this session's has left
		// it for this one or waits still: the one that served it comes
		// back, and after the first session the one it started waits too.
		if i == 0 {
			wait(l.entered, "second worker in Accept")
		}
		wait(l.entered, "serving worker back in Accept")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := srv.started.Load(); n != 2 {
		t.Errorf("goroutines started for %d sessions one after another: %d, want 2 (the first and the one it left waiting in Accept)", sessions, n)
	}
}

// goid is the calling goroutine's id, from its stack header.
func goid() string {
	b := make([]byte, 64)
	b = b[:runtime.Stack(b, false)]
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

// gidListener is a pipeListener that tells each connection which
// goroutine accepted it.
type gidListener struct{ *pipeListener }

func (l gidListener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	c, err := l.pipeListener.AcceptWithContext(ctx)
	if hc, ok := c.(*handshakeSession); ok {
		hc.acceptedBy = goid()
	}
	return c, err
}

// handshakeSession is a pipeSession with a handshake that reports whether
// it runs on the goroutine that accepted it.
type handshakeSession struct {
	pipeSession
	acceptedBy string
	sameG      chan bool
}

func (h *handshakeSession) HandshakeContext(context.Context) error {
	h.sameG <- h.acceptedBy == goid()
	return nil
}

// A connection is served by the goroutine that accepted it: no hand-off
// from an accept loop to a session goroutine (a scheduler wake-up per
// handshake). And however many sessions were served at once, at most
// maxAcceptors goroutines wait in Accept afterwards.
func TestServeDTLSAcceptsOnSessionGoroutine(t *testing.T) {
	cfg := &DTLSServeConfig{
		Handler:     func(*DTLSResponseWriter, *pool.Message) {},
		IdleTimeout: time.Minute, ReadBufferSize: 1472, ResponseCacheEntries: 1,
		Errors: func(error) {},
	}
	srv := newDTLSServer(cfg)
	l := gidListener{&pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.serve(ctx, l) }()
	// 20 handshakes at once: each blocks until read below, so 20
	// goroutines serve at the same time.
	const n = 20
	sessions := make([]*handshakeSession, n)
	var clients []net.Conn
	for i := range sessions {
		client, server := net.Pipe()
		clients = append(clients, client)
		sessions[i] = &handshakeSession{pipeSession: pipeSession{server}, sameG: make(chan bool)}
		select {
		case l.conns <- sessions[i]:
		case <-time.After(10 * time.Second):
			t.Fatalf("connection %d not accepted within 10 s", i)
		}
	}
	for i, s := range sessions {
		select {
		case same := <-s.sameG:
			if !same {
				t.Errorf("connection %d: handshake not on the goroutine that accepted it", i)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("connection %d: no handshake within 10 s", i)
		}
	}
	// Every worker is back in Accept or gone; count those in Accept.
	deadline := time.Now().Add(10 * time.Second)
	for srv.acceptors.Load() < maxAcceptors && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := srv.acceptors.Load(); got != maxAcceptors {
		t.Errorf("workers waiting in Accept after %d sessions at once: %d, want %d", n, got, maxAcceptors)
	}
	for _, c := range clients {
		c.Close()
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

package mqtt

import (
	"crypto/tls"
	"log/slog"
	"net"
	"testing"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/internal/testutil/logbuf"
	"github.com/bastion-iot/bastion/pki"
)

// TestListenerCloseRacingAccept: a connection accepted just before Close
// closed the listener gets no goroutine once Close has begun. Serve called
// wg.Add for it after Close had reached wg.Wait (WaitGroup misuse), and
// its goroutine (the TLS handshake, failing on the stopped context) ran
// after Close returned. Here Serve is held between the accept and its
// wg.Add until Close has returned; then the listener's goroutines are
// waited for, and the handshake's line says whether one ran.
func TestListenerCloseRacingAccept(t *testing.T) {
	lb := &logbuf.Buffer{}
	r := newRigClock(t, queue.Options{}, Config{}, nil, pki.SystemClock{},
		slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})))
	l := &tlsListener{s: r.s, id: "race", addr: "127.0.0.1:0", cfg: &tls.Config{MinVersion: tls.VersionTLS13},
		limit: bridges.NewSourceLimit[net.Conn](4, 4, 4)}
	if err := l.Init(nil); err != nil {
		t.Fatal(err)
	}
	accepted, resume := make(chan struct{}), make(chan struct{})
	l.accepted = func() {
		close(accepted)
		<-resume
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		l.Serve(func(string, net.Conn) error { return nil })
	}()

	c, err := net.Dial("tcp", l.Address())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-accepted
	l.Close(func(string) {})
	close(resume)
	<-served
	l.wg.Wait() // any connection goroutine Serve started

	if got := lb.Lines("TLS handshake ended: the server is stopping"); len(got) > 0 {
		t.Errorf("a connection's goroutine ran after Close returned:\n%s", got)
	}
	if got := lb.Lines("connection closed: the listener is closing"); len(got) != 1 {
		t.Errorf("Serve did not close the connection accepted as Close began; log:\n%s", lb)
	}
	if n := l.limit.Len(); n != 0 {
		t.Errorf("%d unauthenticated slots held after Close, want 0", n)
	}
}

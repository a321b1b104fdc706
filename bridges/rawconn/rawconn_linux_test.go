package rawconn

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// tcpPair returns a rawConn and the other end of a real loopback TCP
// connection.
func tcpPair(t *testing.T) (*rawConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := <-accepted
	if c == nil {
		t.FailNow()
	}
	rc, ok := Wrap(c).(*rawConn)
	if !ok {
		t.Fatalf("Wrap(%T) did not wrap it", c)
	}
	t.Cleanup(func() { rc.Close(); peer.Close() })
	return rc, peer
}

// TestRawConnStream: what one side writes the other reads, byte for byte,
// in both directions, also when a write is larger than the socket buffers
// (the raw write gets EAGAIN and waits in the poller) and while the other
// direction is busy; then the peer's close is io.EOF.
func TestRawConnStream(t *testing.T) {
	rc, peer := tcpPair(t)
	big := make([]byte, 8<<20) // far above the loopback socket buffers
	rand.Read(big)
	var wg sync.WaitGroup
	wg.Add(2)
	var fromPeer, fromRaw bytes.Buffer
	go func() { // peer → rawConn, read by rawConn
		defer wg.Done()
		if _, err := io.Copy(&fromPeer, io.LimitReader(rc, int64(len(big)))); err != nil {
			t.Errorf("rawConn read: %v", err)
		}
	}()
	go func() { // rawConn → peer, read by peer
		defer wg.Done()
		if _, err := io.Copy(&fromRaw, io.LimitReader(peer, int64(len(big)))); err != nil {
			t.Errorf("peer read: %v", err)
		}
	}()
	errs := make(chan error, 2)
	go func() { _, err := peer.Write(big); errs <- err }()
	go func() {
		n, err := rc.Write(big)
		if err == nil && n != len(big) {
			err = errors.New("short write")
		}
		errs <- err
	}()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	wg.Wait()
	if !bytes.Equal(fromPeer.Bytes(), big) || !bytes.Equal(fromRaw.Bytes(), big) {
		t.Fatalf("bytes differ: read %d and %d of %d", fromPeer.Len(), fromRaw.Len(), len(big))
	}
	if n, err := rc.Read(nil); n != 0 || err != nil {
		t.Errorf("Read(nil) = %d, %v; want 0, nil", n, err)
	}
	peer.Close()
	if _, err := rc.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("read after the peer closed: %v; want io.EOF", err)
	}
}

// TestRawConnDeadlineAndClose: a read waiting for data ends with a timeout
// net.Error when its deadline passes and with net.ErrClosed when the
// connection is closed under it, as net.TCPConn's does; a write after
// Close fails the same way.
func TestRawConnDeadlineAndClose(t *testing.T) {
	rc, _ := tcpPair(t)
	rc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := rc.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v; want a timeout", err)
	}
	rc.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := rc.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(10 * time.Millisecond) // let the read park in the poller; Close ends it either way
	rc.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("read when closed: %v; want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("read still blocked 5 s after Close")
	}
	if _, err := rc.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("write after Close: %v; want net.ErrClosed", err)
	}
	var oe *net.OpError
	if _, err := rc.Write([]byte("x")); !errors.As(err, &oe) || oe.Op != "write" {
		t.Errorf("write error %v is not a *net.OpError for write", err)
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

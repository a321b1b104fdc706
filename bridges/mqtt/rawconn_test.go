package mqtt

import (
	"testing"

	"github.com/bastion-iot/bastion/bridges/rawconn"
)

// TestListenerUsesRawConn: device sessions run on rawConn.
func TestListenerUsesRawConn(t *testing.T) {
	s, ca := localServer(t)
	dialPublisher(t, s, ca, "raw-1")
	cl, ok := s.mq.Clients.Get("raw-1")
	if !ok {
		t.Fatal("no session for raw-1")
	}
	pc, ok := cl.Net.Conn.(*pipeConn)
	if !ok {
		t.Fatalf("session conn is %T; want *pipeConn", cl.Net.Conn)
	}
	if nc := pc.Conn.NetConn(); !rawconn.Is(nc) {
		t.Errorf("device TLS runs on %T; want a rawconn", nc)
	}
}

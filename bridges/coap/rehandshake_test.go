package coap_test

import (
	"context"
	"net"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/internal/devicesim"
)

// dialFromPort does d's DTLS handshake with the gateway at addr from the
// loopback port port (0: any), as a device with a fixed source port does.
func dialFromPort(t *testing.T, d *devicesim.Device, addr string, port int) (*rawDevice, *net.UDPConn) {
	t.Helper()
	raddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := d.DTLSConfig(addr)
	if err != nil {
		t.Fatal(err)
	}
	dc, err := piondtls.Client(pc, raddr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dc.Close(); _ = pc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		t.Fatalf("handshake from port %d: %v", port, err)
	}
	return &rawDevice{t: t, dc: dc}, pc
}

// A PSK device with a fixed source port that restarts (its session gone,
// no close_notify sent) handshakes again from the same address and port
// and publishes at once: the gateway answers its ClientHello with a
// HelloVerifyRequest, and once the device echoes the cookie the old
// session ends (its bookkeeping too: one session counted) and the new one
// serves. Before pion-dtls patch (54) the listener handed every datagram
// from that address to the old session, which dropped the ClientHellos, so
// the device was locked out until the old session's idle timeout (10 min).
func TestDeviceRestartFromSamePortGetsNewSession(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	sink := &countSink{}
	s, pskDev, _, pskAddr, _ := startSessionsWithSink(t, id, sink)

	first, pc := dialFromPort(t, pskDev, pskAddr, 0)
	first.send(1, codes.POST, "/t/x", []byte("before"))
	first.expect("publish on the first session", 1, codes.Changed)
	if n := s.Sessions("dev-psk"); n != 1 {
		t.Fatalf("sessions of the device: %d, want 1", n)
	}

	// The device restarts: same port, no state of its old session.
	port := pc.LocalAddr().(*net.UDPAddr).Port
	_ = pc.Close()
	second, _ := dialFromPort(t, pskDev, pskAddr, port)
	second.send(1, codes.POST, "/t/x", []byte("after"))
	second.expect("publish on the new session", 1, codes.Changed)

	// The old session ended and its OnClose ran.
	settled(t, s, 1)
	if n := s.Sessions("dev-psk"); n != 1 {
		t.Errorf("sessions of the device: %d, want 1", n)
	}
	if n := sink.n.Load(); n != 2 {
		t.Errorf("messages accepted: %d, want 2", n)
	}
}

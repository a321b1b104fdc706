package devicesim

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
)

// TestPacketWrites runs paho over lockedConn against the other end of a
// net.Pipe (which hands each Write to one Read: no buffering) and counts
// the writes of a QoS 0 PUBLISH: one with whole (Device.PacketWrites),
// paho's three without. The bytes are the same either way.
func TestPacketWrites(t *testing.T) {
	publish := func(t *testing.T, whole bool) (writes int, wire []byte) {
		client, server := net.Pipe()
		defer client.Close()
		type result struct {
			writes int
			wire   []byte
			err    error
		}
		got := make(chan result, 1)
		go func() {
			defer server.Close()
			var r result
			// CONNECT, however many writes, answered with a v5 CONNACK
			// (success, no properties); then the PUBLISH, counted.
			if _, _, err := readCounted(server); err != nil {
				r.err = err
			} else if _, err := server.Write([]byte{0x20, 3, 0, 0, 0}); err != nil {
				r.err = err
			} else {
				r.wire, r.writes, r.err = readCounted(server)
			}
			io.Copy(io.Discard, server) // the DISCONNECT
			got <- r
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c := paho.NewClient(paho.ClientConfig{Conn: &lockedConn{Conn: client, whole: whole}})
		if _, err := c.Connect(ctx, &paho.Connect{ClientID: "d1", CleanStart: true}); err != nil {
			t.Fatalf("connect: %v", err)
		}
		if _, err := c.Publish(ctx, &paho.Publish{Topic: "devices/d1/t/x", QoS: 0, Payload: bytes.Repeat([]byte{7}, 100)}); err != nil {
			t.Fatalf("publish: %v", err)
		}
		c.Disconnect(&paho.Disconnect{})
		r := <-got
		client.Close()
		<-c.Done()
		if r.err != nil {
			t.Fatalf("server side: %v", r.err)
		}
		return r.writes, r.wire
	}
	n3, wire3 := publish(t, false)
	n1, wire1 := publish(t, true)
	if diff := cmp.Diff(wire3, wire1); diff != "" {
		t.Errorf("PUBLISH bytes differ with whole writes (-paho's writes +whole):\n%s", diff)
	}
	if n1 != 1 || n3 < 2 {
		t.Errorf("PUBLISH written in %d writes with whole, %d without; want 1 and paho's several", n1, n3)
	}
}

// readCounted reads one MQTT packet from c and counts the Reads it took
// (on a net.Pipe, the peer's Writes).
func readCounted(c net.Conn) (packet []byte, reads int, err error) {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return packet, reads, err
		}
		reads++
		packet = append(packet, buf[:n]...)
		// Fixed header: type, then the remaining length (VBI).
		size, i := 0, 1
		for shift := 0; i < len(packet); shift += 7 {
			size |= int(packet[i]&0x7f) << shift
			i++
			if packet[i-1]&0x80 == 0 {
				if len(packet) >= i+size {
					return packet[:i+size], reads, nil
				}
				break
			}
		}
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

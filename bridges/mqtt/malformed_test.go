package mqtt

import (
	"fmt"
	"testing"

	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/bridges/queue"
)

// TestFiveByteLengthClosesSession: a session whose device sends a packet
// with a remaining length of five bytes (a PINGREQ whose length 0 is
// 80 80 80 80 00) is closed before anything more is read from it, and
// counted as bad_request. MQTT allows four bytes; mochi took a fifth of 0
// as adding nothing and answered the PINGREQ (mochi patch (16)). The
// session's first packet is checked by the listener (readFixedHeader);
// this is a packet after it.
func TestFiveByteLengthClosesSession(t *testing.T) {
	for _, ver := range []byte{4, 5} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			r := newRigWith(t, queue.Options{}, Config{}, nil)
			d := r.dial(t, "deva", ver)
			if !d.open() {
				t.Fatal("the session does not answer a PINGREQ")
			}
			// The malformed PINGREQ, then a good one, which a session that
			// took the first would answer too.
			if _, err := d.c.Write([]byte{0xc0, 0x80, 0x80, 0x80, 0x80, 0x00, 0xc0, 0x00}); err != nil {
				t.Fatal(err)
			}
			d.closed()
			waitFor(t, "the refusal to be counted", func() bool { return r.refusals(hub.ReasonBadRequest) == 1 })
		})
	}
}

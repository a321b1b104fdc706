package coap_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message/codes"

	"github.com/bastion-iot/bastion/bridges"
)

// topicSink refuses every message whose topic ends in /long as the upstream
// link refuses a topic beyond its limits, and takes the others.
type topicSink struct{}

func (topicSink) Accept(_ context.Context, m bridges.Message) error {
	if strings.HasSuffix(m.Topic, "/long") {
		return fmt.Errorf("upstream accept from %s: topic beyond upstream.max_topic_levels: %w", m.Device, bridges.ErrTopicRefused)
	}
	return nil
}

// TestTopicRefusedIsAClientError: telemetry the Sink refuses for its topic
// (bridges.ErrTopicRefused: sending it again cannot succeed) is answered
// 4.00, a client error, not 5.00 or 5.03 (retry later); the session goes on.
func TestTopicRefusedIsAClientError(t *testing.T) {
	id := &fakeIdentity{key: []byte("0123456789abcdef"), revoked: map[string]bool{}}
	_, dev, _, addr, _ := startSessionsWithSink(t, id, topicSink{})
	c := dialRaw(t, dev, addr)
	c.send(1, codes.POST, "/t/long", []byte("x"))
	if a := c.expect("telemetry on a refused topic", 1, codes.BadRequest); a.maxAge != 0 {
		t.Errorf("4.00 with Max-Age %d, want none", a.maxAge)
	}
	c.send(2, codes.POST, "/t/n", []byte("x"))
	c.expect("telemetry on another topic", 2, codes.Changed)
}

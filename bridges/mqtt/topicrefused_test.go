package mqtt

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/hub"
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

// TestTopicRefusedIsABadTopic: a message the Sink refuses for its topic
// (bridges.ErrTopicRefused: sending it again cannot succeed) is answered as
// a bad topic, PUBACK 0x90, not 0x97 (quota exceeded: retry later), and an
// MQTT 3.1.1 session, which has no negative PUBACK, is not closed for it
// (the device would send it again after reconnecting): the message gets no
// PUBACK and the next one does. It is counted as topic_refused (before,
// under no reason).
func TestTopicRefusedIsABadTopic(t *testing.T) {
	for _, ver := range []byte{5, 4} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			s, ca := sinkServer(t, topicSink{})
			r := &rig{s: s, ca: ca}
			d := r.dial(t, "dev-topic", ver)
			d.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: 1,
				TopicName: "devices/dev-topic/t/long", Payload: []byte("x")})
			d.publish(2, 2)
			want := []ack{{packets.Puback, 1, packets.ErrTopicNameInvalid.Code}, {packets.Puback, 2, 0}}
			if ver == 4 {
				want = want[1:]
			}
			if diff := cmp.Diff(want, d.readAcks(len(want))); diff != "" {
				t.Errorf("device saw (-want +got):\n%s", diff)
			}
			if n := testutil.ToFloat64(s.m.Refused.WithLabelValues(hub.MQTT, hub.ReasonTopicRefused)); n != 1 {
				t.Errorf("topic_refused refusals %v, want 1", n)
			}
		})
	}
}

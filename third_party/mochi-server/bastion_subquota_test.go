package mqtt

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestBastionSubscriptionQuota: with a client at
// MaximumSubscriptionsPerClient a new filter is over the quota, a held one
// is not (resubscribing replaces it), and 0 means no limit. The SUBACK's
// 0x97 is checked end to end by the gateway (bridges/mqtt).
func TestBastionSubscriptionQuota(t *testing.T) {
	cl, _, _ := newTestClient()
	require.False(t, OverSubscriptionQuota(cl, "a/1", 2))
	cl.State.Subscriptions.Add("a/1", packets.Subscription{Filter: "a/1"})
	cl.State.Subscriptions.Add("a/2", packets.Subscription{Filter: "a/2"})
	require.True(t, OverSubscriptionQuota(cl, "a/3", 2))
	require.False(t, OverSubscriptionQuota(cl, "a/2", 2), "a held filter is replaced, not added")
	require.False(t, OverSubscriptionQuota(cl, "a/3", 0), "0: no limit")
}

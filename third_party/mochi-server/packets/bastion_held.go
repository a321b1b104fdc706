package packets

// HeldBytes is what the variable-length parts of pk hold in memory: its
// topic, payload and properties (Bastion patch (17), third_party/README.md).
// A user property counts its key and value and the UserProperty that holds
// them (two string headers, 32 bytes on 64-bit), a subscription identifier
// the int it is kept as (8 bytes): a few bytes of the wire each, so a
// packet of many empty ones holds several times its size. The Packet
// itself is not counted.
func (pk *Packet) HeldBytes() int {
	p := &pk.Properties
	n := len(pk.TopicName) + len(pk.Payload) +
		len(p.ContentType) + len(p.ResponseTopic) + len(p.CorrelationData) +
		len(p.ReasonString) + len(p.AssignedClientID) + len(p.AuthenticationMethod) +
		len(p.AuthenticationData) + len(p.ResponseInfo) + len(p.ServerReference) +
		8*len(p.SubscriptionIdentifier)
	for _, u := range p.User {
		n += userPropertyOverhead + len(u.Key) + len(u.Val)
	}
	return n
}

// userPropertyOverhead is a UserProperty's own size: two string headers.
const userPropertyOverhead = 32

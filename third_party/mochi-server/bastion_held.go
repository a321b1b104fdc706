package mqtt

import (
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Bastion patch (17), third_party/README.md: the bytes of the messages the
// broker holds for its clients are counted and bounded.
//
// A message published to a client is copied for it (Packet.Copy copies the
// payload) and held until it is done with: a QoS 1 or 2 message in the
// client's Inflight until its acknowledgement, its expiry, or the end of the
// session (an hour after the connection, for a session that outlives it),
// also while the client is disconnected; a QoS 0 message in the client's
// outbound queue until it is written. Upstream bounded only their number
// (MaximumInflight, MaximumClientWritesPending), so what a client held grew
// with the size of the messages, and what the broker held with the number
// of clients. Capabilities.MaximumClientHeldBytes and MaximumHeldBytes bound
// the bytes; a message past either is not taken for that client and is
// reported through OnPublishDropped, as a message the full queue drops is.

// heldPacketOverhead is what a held packet costs besides its HeldBytes,
// rounded up: the packets.Packet (800 bytes on 64-bit) that Inflight's map
// stores by value, each in an allocation of its own (values that large are
// kept out of line; 896 bytes), and its map slot; a queued packet is an
// allocation of the same size. So many small messages are counted at what
// they hold, not as free.
const heldPacketOverhead = 1 << 10

// HeldSize is what the broker is counted to hold for pk while it is held
// for a client.
func HeldSize(pk *packets.Packet) int64 {
	return heldPacketOverhead + int64(pk.HeldBytes())
}

// HeldBytes returns what the broker holds for all its clients: their
// inflight messages and their queued QoS 0 messages.
func (s *Server) HeldBytes() int64 { return s.held.Load() }

// HeldBytes returns what the broker holds for cl: its inflight messages
// (also while it is disconnected) and its queued QoS 0 messages.
func (cl *Client) HeldBytes() int64 {
	return cl.State.Inflight.Bytes() + cl.State.queued.Load()
}

// heldLimit is what publishToClient allows a client to hold.
type heldLimit struct {
	queued int64 // what the client holds besides its Inflight
	client int64 // Capabilities.MaximumClientHeldBytes; 0: no bound
	total  int64 // Capabilities.MaximumHeldBytes; 0: no bound
}

func (cl *Client) heldLimit() heldLimit {
	c := cl.ops.options.Capabilities
	return heldLimit{queued: cl.State.queued.Load(), client: c.MaximumClientHeldBytes, total: c.MaximumHeldBytes}
}

// admit reports whether a client holding inflight bytes in its Inflight
// may hold size more, and if so counts size in total (nil: the client is
// no server's). A client that holds nothing may hold one message of any
// size, so that a message larger than the bound still reaches a client
// that reads; the total bound has no such exception.
func (l heldLimit) admit(inflight, size int64, total *atomic.Int64) bool {
	held := inflight + l.queued
	if l.client > 0 && held > 0 && held+size > l.client {
		return false
	}
	if total == nil {
		return true
	}
	if t := total.Add(size); l.total > 0 && t > l.total {
		total.Add(-size)
		return false
	}
	return true
}

// queue counts size, a QoS 0 packet about to be queued for cl, in what cl
// and the server hold, if the bounds allow it.
func (cl *Client) queue(size int64) bool {
	l := cl.heldLimit()
	if !l.admit(cl.State.Inflight.Bytes(), size, cl.ops.held) {
		return false
	}
	cl.State.queued.Add(size)
	return true
}

// unqueue gives back what queue counted for pk once pk has left the
// outbound queue (written, or dropped with the connection). Only QoS 0
// packets are counted there: a QoS 1 or 2 packet is counted in Inflight,
// which holds the same payload.
func (cl *Client) unqueue(pk *packets.Packet) {
	if pk.FixedHeader.Qos != 0 {
		return
	}
	size := HeldSize(pk)
	cl.State.queued.Add(-size)
	if cl.ops.held != nil {
		cl.ops.held.Add(-size)
	}
}

// dropQueued empties the outbound queue of a client whose connection has
// ended. Upstream left the packets in it: a session that outlives its
// connection kept them, QoS 0 messages never to be sent and copies of the
// inflight ones (which are sent again from Inflight), for the hour it is
// kept. It runs when the client stops, and after a packet was queued for a
// client found stopped, so that a packet queued as the client stopped is
// dropped by one or the other.
func (cl *Client) dropQueued() {
	for {
		select {
		case pk := <-cl.State.outbound:
			atomic.AddInt32(&cl.State.outboundQty, -1)
			cl.unqueue(pk)
		default:
			return
		}
	}
}

// DropInflights deletes the inflight messages of cl, a client whose
// connection has ended, and returns how many it deleted and the bytes they
// held: for an embedder that makes room within MaximumHeldBytes. It deletes
// nothing once a new connection has taken cl's session over, with its
// inflight messages (cloneAndSeal): decided under Inflight's lock, so each
// message is either dropped here or handed over, never counted dropped and
// delivered. The hooks are told as by ClearInflights.
func (cl *Client) DropInflights() (n int, bytes int64) {
	dropped, bytes := cl.State.Inflight.takeAllUnlessSealed()
	for _, pk := range dropped {
		cl.ops.hooks.OnQosDropped(cl, pk)
		atomic.AddInt64(&cl.ops.info.Inflight, -1)
	}
	return len(dropped), bytes
}

// takeAllUnlessSealed empties i, unless it is sealed, and returns what it
// held.
func (i *Inflight) takeAllUnlessSealed() ([]packets.Packet, int64) {
	i.Lock()
	defer i.Unlock()
	if i.sealed || len(i.internal) == 0 {
		return nil, 0
	}
	out := make([]packets.Packet, 0, len(i.internal))
	for _, pk := range i.internal {
		out = append(out, pk)
	}
	i.internal = map[uint16]packets.Packet{} // a new map: a cleared one keeps its buckets
	i.order = nil
	n := i.bytes
	i.bytes = 0
	if i.total != nil {
		i.total.Add(-n)
	}
	return out, n
}

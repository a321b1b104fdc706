// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2023 mochi-mqtt, mochi-co
// SPDX-FileContributor: mochi-co

package mqtt

import (
	"maps"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Inflight is a map of InflightMessage keyed on packet id.
type Inflight struct {
	sync.RWMutex
	internal            map[uint16]packets.Packet // internal contains the inflight packets
	receiveQuota        int32                     // remaining inbound qos quota for flow control
	sendQuota           int32                     // remaining outbound qos quota for flow control
	maximumReceiveQuota int32                     // maximum allowed receive quota
	maximumSendQuota    int32                     // maximum allowed send quota
	sealed              bool                      // Bastion patch (14): see cloneAndSeal
	// Bastion patch (17), bastion_held.go: bytes is the HeldSize of the
	// packets in internal, kept with it, and total the server's count of
	// the bytes held for all its clients (Server.HeldBytes), to which every
	// change of bytes is added; nil for an Inflight of no server's client.
	bytes int64
	total *atomic.Int64
	// Bastion patch (18): order numbers the packets in the order they
	// were added (seq the last number given), for GetAll.
	order map[uint16]uint64
	seq   uint64
}

// NewInflights returns a new instance of an Inflight packets map.
func NewInflights() *Inflight {
	return newInflights(nil)
}

// newInflights is NewInflights for a client of the server whose count of
// held bytes is total (Bastion patch (17)).
func newInflights(total *atomic.Int64) *Inflight {
	return &Inflight{
		internal: map[uint16]packets.Packet{},
		total:    total,
	}
}

// Set adds or updates an inflight packet by packet id.
func (i *Inflight) Set(m packets.Packet) bool {
	i.Lock()
	defer i.Unlock()

	_, ok := i.internal[m.PacketID]
	i.put(m, 0)
	return !ok
}

// put stores m under its packet id and counts the bytes this changes;
// reserved of them are counted in total already (heldLimit.admit). i is
// locked (Bastion patch (17)).
func (i *Inflight) put(m packets.Packet, reserved int64) {
	d := HeldSize(&m)
	if old, ok := i.internal[m.PacketID]; ok {
		d -= HeldSize(&old)
	} else {
		i.seq++
		if i.order == nil {
			i.order = map[uint16]uint64{}
		}
		i.order[m.PacketID] = i.seq
	}
	i.internal[m.PacketID] = m
	i.bytes += d
	if i.total != nil {
		i.total.Add(d - reserved)
	}
}

// Bytes returns the HeldSize of the packets held (Bastion patch (17)).
func (i *Inflight) Bytes() int64 {
	i.RLock()
	defer i.RUnlock()
	return i.bytes
}

// Get returns an inflight packet by packet id.
func (i *Inflight) Get(id uint16) (packets.Packet, bool) {
	i.RLock()
	defer i.RUnlock()

	if m, ok := i.internal[id]; ok {
		return m, true
	}

	return packets.Packet{}, false
}

// Len returns the size of the inflight messages map.
func (i *Inflight) Len() int {
	i.RLock()
	defer i.RUnlock()
	return len(i.internal)
}

// Clone returns a new instance of Inflight with the same message data.
// This is used when transferring inflights from a taken-over session.
func (i *Inflight) Clone() *Inflight {
	c := newInflights(i.total)
	i.RLock()
	defer i.RUnlock()
	for k, v := range i.internal {
		c.internal[k] = v
	}
	c.copied(i)
	return c
}

// copied takes over what i keeps besides its packets, which were just
// copied into c; i is locked. The bytes are counted again (Bastion patch
// (17)): the server holds them twice until i drops its copies. The order
// is kept (Bastion patch (18)).
func (c *Inflight) copied(i *Inflight) {
	c.bytes = i.bytes
	if c.total != nil {
		c.total.Add(i.bytes)
	}
	c.order, c.seq = maps.Clone(i.order), i.seq
}

// cloneAndSeal is Clone, and from then on setUnlessSealed adds nothing
// (Bastion patch (14), third_party/README.md): a session taken over hands
// its inflight messages to the client that takes it over, and a message
// published to it afterwards must follow them instead of staying here.
func (i *Inflight) cloneAndSeal() *Inflight {
	c := newInflights(i.total)
	i.Lock()
	defer i.Unlock()
	for k, v := range i.internal {
		c.internal[k] = v
	}
	c.copied(i)
	i.sealed = true
	return c
}

// setUnlessSealed is Set, unless cloneAndSeal has been called: then it
// adds nothing and reports sealed (Bastion patch (14)); or unless m, a
// packet for a new id, would take what the client holds past lim: then
// it adds nothing and reports full (Bastion patch (17)). The bound is
// checked and m added under i's lock, so publishes to one client side by
// side cannot pass it together.
func (i *Inflight) setUnlessSealed(m packets.Packet, lim heldLimit) (added, sealed, full bool) {
	i.Lock()
	defer i.Unlock()
	if i.sealed {
		return false, true, false
	}
	_, ok := i.internal[m.PacketID]
	var reserved int64
	if !ok {
		reserved = HeldSize(&m)
		if !lim.admit(i.bytes, reserved, i.total) {
			return false, false, true
		}
	}
	i.put(m, reserved)
	return !ok, false, false
}

// GetAll returns all the inflight messages.
func (i *Inflight) GetAll(immediate bool) []packets.Packet {
	i.RLock()
	defer i.RUnlock()
	return i.getAll(immediate)
}

// getAll is GetAll; i is locked (Bastion patch (20): NextImmediate took
// the read lock and then GetAll's, see NextImmediate).
func (i *Inflight) getAll(immediate bool) []packets.Packet {
	m := []packets.Packet{}
	for _, v := range i.internal {
		if !immediate || (immediate && v.Expiry < 0) {
			m = append(m, v)
		}
	}

	// Bastion patch (18): by the second they were published in, then in
	// the order they were added, so that a session resumed gets them in
	// the order they were sent [MQTT-4.6.0-1]. Upstream sorted by the
	// second alone, truncated to 16 bits, which left the messages of one
	// second in the map's random order and put those of the second after
	// a wrap (every 18 hours) before older ones.
	sort.Slice(m, func(a, b int) bool {
		if m[a].Created != m[b].Created {
			return m[a].Created < m[b].Created
		}
		return i.order[m[a].PacketID] < i.order[m[b].PacketID]
	})

	return m
}

// NextImmediate returns the next inflight packet which is indicated to be sent immediately.
// This typically occurs when the quota has been exhausted, and we need to wait until new quota
// is free to continue sending.
//
// Bastion patch (20): it reads under one read lock. Upstream called GetAll
// under the read lock it held, which took it a second time: a writer
// (a publish to the client, a PUBACK) that came between the two made the
// second wait for it while it waited for the first, and the client's
// reader, which calls this after every packet, hung for good.
func (i *Inflight) NextImmediate() (packets.Packet, bool) {
	i.RLock()
	defer i.RUnlock()

	m := i.getAll(true)
	if len(m) > 0 {
		return m[0], true
	}

	return packets.Packet{}, false
}

// sendImmediate takes the packet NextImmediate would return and keeps it
// in flight as sent: its Expiry, -1 while it waited for send quota, is
// the one publishToSubscribers gave it, for the server's maximum
// (messageExpiry) (Bastion patch (19), see Server.processPacket). Found
// and changed under one lock, so that a packet deleted meanwhile (a
// session dropped, a message expired) is not put back.
func (i *Inflight) sendImmediate(maximumExpiry int64) (packets.Packet, bool) {
	i.Lock()
	defer i.Unlock()

	m := i.getAll(true)
	if len(m) == 0 {
		return packets.Packet{}, false
	}
	return i.markSent(m[0], maximumExpiry), true
}

// markSent stores pk, which waited for send quota, as sent: with its
// expiry back (Bastion patch (19)). i is locked.
func (i *Inflight) markSent(pk packets.Packet, maximumExpiry int64) packets.Packet {
	pk.Expiry = messageExpiry(maximumExpiry, &pk)
	i.put(pk, 0) // the same id: its order is kept, its bytes are the same
	return pk
}

// resendOrWait is what ResendInflightMessages does with the PUBLISH of id
// for a client whose Receive Maximum bounds what it is sent (Bastion
// patch (22)): while send quota is left, it takes one and returns the
// packet to write (marked DUP if it was sent before, to an earlier
// connection; kept as sent if it had waited for quota); once none is
// left, the packet waits for quota (Expiry -1, as publishToClient marks
// one; DUP kept for when it goes) and send is false. Decided under the
// lock, so that a packet deleted meanwhile is not put back.
func (i *Inflight) resendOrWait(id uint16, maximumExpiry int64) (pk packets.Packet, send bool) {
	i.Lock()
	defer i.Unlock()

	pk, ok := i.internal[id]
	if !ok {
		return pk, false
	}
	sent := pk.Expiry >= 0
	if atomic.LoadInt32(&i.sendQuota) == 0 {
		if sent {
			pk.FixedHeader.Dup = true // [MQTT-3.3.1-1]
			pk.Expiry = -1
			i.put(pk, 0)
		}
		return pk, false
	}
	if !sent {
		pk = i.markSent(pk, maximumExpiry)
	} else {
		pk.FixedHeader.Dup = true // [MQTT-3.3.1-1]
	}
	i.DecreaseSendQuota()
	return pk, true
}

// Delete removes an in-flight message from the map. Returns true if the message existed.
func (i *Inflight) Delete(id uint16) bool {
	i.Lock()
	defer i.Unlock()

	m, ok := i.internal[id]
	if ok {
		// Bastion patch (17): what it held is given back.
		d := HeldSize(&m)
		i.bytes -= d
		if i.total != nil {
			i.total.Add(-d)
		}
	}
	delete(i.internal, id)
	delete(i.order, id) // Bastion patch (18)

	return ok
}

// TakeRecieveQuota reduces the receive quota by 1.
func (i *Inflight) DecreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) > 0 {
		atomic.AddInt32(&i.receiveQuota, -1)
	}
}

// TakeRecieveQuota increases the receive quota by 1.
func (i *Inflight) IncreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) < atomic.LoadInt32(&i.maximumReceiveQuota) {
		atomic.AddInt32(&i.receiveQuota, 1)
	}
}

// ResetReceiveQuota resets the receive quota to the maximum allowed value.
func (i *Inflight) ResetReceiveQuota(n int32) {
	atomic.StoreInt32(&i.receiveQuota, n)
	atomic.StoreInt32(&i.maximumReceiveQuota, n)
}

// DecreaseSendQuota reduces the send quota by 1.
func (i *Inflight) DecreaseSendQuota() {
	if atomic.LoadInt32(&i.sendQuota) > 0 {
		atomic.AddInt32(&i.sendQuota, -1)
	}
}

// IncreaseSendQuota increases the send quota by 1.
func (i *Inflight) IncreaseSendQuota() {
	if atomic.LoadInt32(&i.sendQuota) < atomic.LoadInt32(&i.maximumSendQuota) {
		atomic.AddInt32(&i.sendQuota, 1)
	}
}

// ResetSendQuota resets the send quota to the maximum allowed value.
func (i *Inflight) ResetSendQuota(n int32) {
	atomic.StoreInt32(&i.sendQuota, n)
	atomic.StoreInt32(&i.maximumSendQuota, n)
}

package queue

import "strings"

// Each device's share of the queue. MaxBytes alone let one device fill the
// queue: a device publishing at QoS 0 (no fsync to wait for) at LAN speed
// fills 64 MiB in seconds while the upstream link is down, or whenever it
// sends faster than the uplink drains, and then every device is refused
// until 64 MiB are delivered. So admission also counts, per device, the
// bytes of its held messages, and refuses a device at MaxDeviceBytes.
//
// The share is a fixed fraction of MaxBytes, not one that grows while the
// other devices are idle: a device is then refused or not by what it holds
// alone, which an operator can read off its metrics, and not by what other
// devices happened to hold at that moment. A fraction of 1/8 means eight
// devices must each fill their share before the queue is full for the
// rest, whether the gateway has 3 devices or 3,000, while a lone busy
// device can still hold 8 MiB of the default 64 MiB (some 50,000
// messages of 100 bytes, each a record of about 165: 14 hours at one a
// second) through an outage. A
// gateway whose one device must hold more raises the share (up to
// MaxBytes: no share at all).

// deviceShare: the default MaxDeviceBytes is MaxBytes/deviceShare.
const deviceShare = 8

// maxRecord is the largest record of a message of at most maxMessage bytes.
func maxRecord(maxMessage int) int64 {
	return int64(recHeader + msgOverhead + maxMessage)
}

// deviceHeld is what one device holds in the queue: the bytes of the
// records of its held messages, pending ones (admitted, not yet written)
// included. Every held entry and pending message points at its device's.
type deviceHeld struct {
	id    string
	bytes int64
}

// devIdleKept: q.devs keeps the entries of devices that hold nothing (so
// that a device whose every message is delivered before it sends the next,
// the usual case while the link keeps up, costs no allocation per message)
// until more than devIdleKept of them, and more than those holding
// something, are kept: then they are all dropped. So q.devs has at most
// twice as many entries as devices with held messages, plus devIdleKept
// (some 300 KiB of them). Fewer cost the gateways with more devices than
// that: devices sending in turn while the link keeps up have their counts
// dropped and made again all the time, two allocations and some 200 ns per
// message more (BenchmarkAdmitAck, 3,000 devices, with 1,024).
const devIdleKept = 4096

// deviceLocked returns id's deviceHeld, made if it has none. Caller holds
// q.mu.
func (q *Queue) deviceLocked(id string) *deviceHeld {
	if d := q.devs[id]; d != nil {
		return d
	}
	if q.devs == nil {
		q.devs = map[string]*deviceHeld{}
	}
	q.dropIdleDueLocked()
	// A copy: id may be part of a larger buffer of the caller's.
	d := &deviceHeld{id: strings.Clone(id)}
	q.devs[d.id] = d
	q.devIdle++
	return d
}

// holdLocked counts n more bytes held by d. Caller holds q.mu.
func (q *Queue) holdLocked(d *deviceHeld, n int64) {
	if d.bytes == 0 {
		q.devIdle--
	}
	d.bytes += n
}

// releaseLocked counts n bytes of d's no longer held (delivered, dropped,
// or refused after admission). Caller holds q.mu.
func (q *Queue) releaseLocked(d *deviceHeld, n int64) {
	d.bytes -= n
	if d.bytes != 0 {
		return
	}
	q.devIdle++
	q.dropIdleDueLocked()
}

// dropIdleDueLocked drops the entries of devices that hold nothing once
// there are too many of them (see devIdleKept). Caller holds q.mu.
func (q *Queue) dropIdleDueLocked() {
	if q.devIdle > devIdleKept && 2*q.devIdle > len(q.devs) {
		q.dropIdleLocked()
	}
}

// dropIdleLocked drops the entries of devices that hold nothing. No held
// entry or pending message points at one (it would hold its bytes), so
// none is counted against a dropped entry. Caller holds q.mu.
func (q *Queue) dropIdleLocked() {
	for id, d := range q.devs {
		if d.bytes == 0 {
			delete(q.devs, id)
		}
	}
	q.devIdle = 0
}

// releaseBatchLocked releases the bytes of batch, refused after its
// admission (a failed write, or the queue stopped after one): none of it
// is held. Caller holds q.mu.
func (q *Queue) releaseBatchLocked(batch []pending) {
	for i := range batch {
		q.releaseLocked(batch[i].dev, int64(batch[i].n))
	}
}

// recoveredDevice returns id's count in devs, made if it has none: recover
// counts there, and installs only the devices holding something once the
// delivered messages are known (installDevices). In q.devs every device
// would hold nothing until then, and dropIdleDueLocked would drop counts
// the entries already point at.
func recoveredDevice(devs map[string]*deviceHeld, id string) *deviceHeld {
	d := devs[id]
	if d == nil {
		d = &deviceHeld{id: id}
		devs[id] = d
	}
	return d
}

// installDevices makes the counts recover built, of the devices that hold
// something, q's.
func (q *Queue) installDevices(devs map[string]*deviceHeld) {
	for id, d := range devs {
		if d.bytes == 0 {
			delete(devs, id)
		}
	}
	q.devs, q.devIdle = devs, 0
}

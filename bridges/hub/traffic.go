package hub

import (
	"sync"
	"time"
)

// Traffic is one device's counters since the gateway started: what the
// console shows on a device's page. They live in memory only; nothing about
// a device's traffic is written to flash.
type Traffic struct {
	MessagesIn  uint64    `json:"messages_in"`  // telemetry admitted from the device (one not made durable later counts in Refused too)
	BytesIn     uint64    `json:"bytes_in"`     // payload bytes of those
	MessagesOut uint64    `json:"messages_out"` // commands handed to its transports
	BytesOut    uint64    `json:"bytes_out"`
	Refused     uint64    `json:"refused"` // telemetry refused (queue full, bad topic, not made durable)
	LastSeen    time.Time `json:"last_seen,omitzero"`
}

// TrafficOptOut switches off what the hub keeps per device: the console's
// privacy opt-outs "device.counters" and "device.last_seen". The zero value
// keeps both.
type TrafficOptOut struct {
	Counters bool
	LastSeen bool
}

type trafficTable struct {
	mu  sync.Mutex
	m   map[string]*Traffic
	off TrafficOptOut
}

func (t *trafficTable) update(device string, f func(*Traffic)) { t.apply(device, true, f) }

// updateExisting is update for a device that has a row already: it never
// makes one (a command to a device id the gateway has not seen).
func (t *trafficTable) updateExisting(device string, f func(*Traffic)) { t.apply(device, false, f) }

func (t *trafficTable) apply(device string, create bool, f func(*Traffic)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.off.Counters && t.off.LastSeen {
		return
	}
	if t.m == nil {
		t.m = map[string]*Traffic{}
	}
	c := t.m[device]
	if c == nil {
		if !create {
			return
		}
		c = &Traffic{}
		t.m[device] = c
	}
	f(c)
	t.off.strip(c)
}

// strip zeroes what is opted out, so it is never kept, not only not shown.
func (o TrafficOptOut) strip(c *Traffic) {
	if o.Counters {
		*c = Traffic{LastSeen: c.LastSeen}
	}
	if o.LastSeen {
		c.LastSeen = time.Time{}
	}
}

// SetTrafficOptOut applies the privacy opt-outs to what is kept from now on
// and erases what was kept before of the data now switched off.
func (h *Hub) SetTrafficOptOut(o TrafficOptOut) {
	h.traffic.mu.Lock()
	defer h.traffic.mu.Unlock()
	h.traffic.off = o
	for dev, c := range h.traffic.m {
		o.strip(c)
		if *c == (Traffic{}) {
			delete(h.traffic.m, dev)
		}
	}
}

// Traffic returns a device's counters, and false if it has not been seen
// since the gateway started.
func (h *Hub) Traffic(device string) (Traffic, bool) {
	h.traffic.mu.Lock()
	defer h.traffic.mu.Unlock()
	c, ok := h.traffic.m[device]
	if !ok {
		return Traffic{}, false
	}
	return *c, true
}

// forgetTraffic drops a device's counters (Forget: a revoked or erased device).
func (h *Hub) forgetTraffic(device string) {
	h.traffic.mu.Lock()
	delete(h.traffic.m, device)
	h.traffic.mu.Unlock()
}

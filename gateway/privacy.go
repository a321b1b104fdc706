package gateway

import (
	"strings"

	"github.com/bastion-iot/bastion/bridges/hub"
)

// Privacy opt-outs (console privacy page, store.OptOuts) that the gateway
// enforces. The console's catalogue names them; these are the optional ones.
const (
	optOutLastSeen = "device.last_seen"
	optOutCounters = "device.counters"
	optOutFwStatus = "firmware.status"
)

// optOuts reads the opt-outs from the store. A store that cannot be read
// counts as opted out of everything optional: privacy fails closed. It
// decides what is kept and shown, never what is erased (startOptOuts).
func (g *Gateway) optOuts() map[string]bool {
	m, err := g.store.OptOuts()
	if err != nil {
		g.log.Error("privacy opt-outs unreadable; treating every optional datum as switched off", "err", err)
		return map[string]bool{optOutLastSeen: true, optOutCounters: true, optOutFwStatus: true}
	}
	return m
}

func (g *Gateway) optedOut(datum string) bool { return g.optOuts()[datum] }

// applyOptOuts makes the opt-outs true in what the gateway keeps: the hub
// stops keeping (and erases) per-device counters or last-seen times, and
// stored firmware status reports are erased, with the MQTT broker's
// retained ones (keepRetained keeps new ones out). It runs at start and
// after every change in the console.
func (g *Gateway) applyOptOuts(off map[string]bool) {
	if g.hub != nil {
		g.hub.SetTrafficOptOut(hub.TrafficOptOut{Counters: off[optOutCounters], LastSeen: off[optOutLastSeen]})
	}
	if off[optOutFwStatus] && g.mqtt != nil {
		if _, err := g.mqtt.DropRetainedNotKept(); err != nil {
			g.log.Error("firmware.status opted out but the retained MQTT status reports could not be erased from the store", "err", err)
		}
	}
	if off[optOutFwStatus] {
		stored, err := g.store.FirmwareStatuses()
		if err == nil && len(stored) > 0 {
			for dev := range stored {
				stored[dev] = nil // a nil value deletes
			}
			err = g.store.PutFirmwareStatuses(stored)
		}
		if err != nil {
			g.log.Error("firmware.status opted out but the stored reports could not be erased", "err", err)
		}
	}
}

// startOptOuts applies the stored opt-outs once the hub exists. Opt-outs
// that cannot be read are not taken as all switched on, which erased every
// stored firmware status report: nothing is erased. The hub keeps no
// counters or last-seen times (it holds none yet), and stored reports are
// neither loaded nor shown while the opt-outs stay unreadable (optedOut,
// fwStatusStore); a report is written only if the write's own transaction
// reads the opt-out as off.
func (g *Gateway) startOptOuts() { g.startOptOutsFrom(g.store.OptOuts()) }

// startOptOutsFrom is startOptOuts with the store's answer.
func (g *Gateway) startOptOutsFrom(off map[string]bool, err error) {
	if err != nil {
		g.log.Error("privacy opt-outs unreadable at start: erasing nothing; the hub keeps no per-device counters or last-seen times (until restart or a change on the console's privacy page), and stored firmware status reports are not shown while they stay unreadable", "err", err)
		if g.hub != nil {
			g.hub.SetTrafficOptOut(hub.TrafficOptOut{Counters: true, LastSeen: true})
		}
		return
	}
	g.applyOptOuts(off)
}

// keepRetained is the MQTT broker's KeepRetained: a retained firmware
// status report (devices/{id}/s/fw) is not kept while firmware.status is
// opted out (or the opt-outs are unreadable, as optedOut).
func (g *Gateway) keepRetained(topic string) bool {
	id, ok := strings.CutPrefix(topic, "devices/")
	if ok {
		id, ok = strings.CutSuffix(id, "/"+hub.ClassStatus+"/fw")
	}
	if !ok || id == "" || strings.Contains(id, "/") {
		return true
	}
	return !g.optedOut(optOutFwStatus)
}

// fwStatusStore is the firmware cache's StatusStore with the
// firmware.status opt-out applied: while it is on, nothing is loaded and
// every write is a delete, so reports live only in memory (to avoid
// offering an installed image again) and are gone at restart.
type fwStatusStore struct{ g *Gateway }

func (s fwStatusStore) FirmwareStatuses() (map[string][]byte, error) {
	if s.g.optedOut(optOutFwStatus) {
		return map[string][]byte{}, nil
	}
	return s.g.store.FirmwareStatuses()
}

// PutFirmwareStatuses checks the opt-out in the write's own transaction:
// read before it, an opt-out committing in between (and erasing what was
// stored) was followed by the write of a report it should have stopped.
func (s fwStatusStore) PutFirmwareStatuses(batch map[string][]byte) error {
	return s.g.store.PutFirmwareStatusesUnless(optOutFwStatus, batch)
}

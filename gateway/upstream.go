package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/queue"
	"github.com/bastion-iot/bastion/bridges/upstream"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/gateway/store"
)

// errNoDownlink is returned for a command that arrives before any device
// transport can deliver it.
var errNoDownlink = errors.New("no device transport is running to deliver the command")

// openUpstream opens the durable queue and the cloud link. The transports
// take the link as their Sink: it applies the privacy rules first, so a
// message that must stay local never reaches the disk.
func (g *Gateway) openUpstream(cfg config.Config) error {
	if !cfg.Upstream.Enabled {
		return nil
	}
	var err error
	g.queue, err = queue.Open(filepath.Join(cfg.StateDir, "queue"), queue.Options{
		MaxBytes:       cfg.Upstream.QueueMaxBytes,
		MaxDeviceBytes: cfg.Upstream.QueueMaxBytesPerDevice,
		MaxAge:         cfg.Upstream.QueueMaxAge.D(),
	}, g.log, g.metrics.reg) // the queue names its component itself
	if err != nil {
		return err
	}
	ucfg := cfg.Upstream.Config
	ucfg.Forward = g.forwardRules(ucfg) // the console's and the file's
	g.upstream, err = upstream.New(ucfg, g.queue, g.deliverCommand, g.log, g.metrics.reg)
	if err != nil {
		return err
	}
	// The parking queue has no metrics of its own (its names would clash
	// with the main queue's); the link exports its depth.
	g.parking, err = queue.Open(filepath.Join(cfg.StateDir, "parked"), queue.Options{
		MaxBytes: cfg.Upstream.ParkedMaxBytes,
		MaxAge:   100 * 365 * 24 * time.Hour, // kept until an operator decides
	}, g.log.With("queue", "parked"), nil)
	if err != nil {
		return err
	}
	g.upstream.SetParking(g.parking)
	g.sink = g.upstream
	g.addStatus("upstream", func() any {
		st := g.queue.Stats()
		var oldest string
		if !st.Oldest.IsZero() {
			oldest = time.Since(st.Oldest).Round(time.Second).String()
		}
		ps := g.parking.Stats()
		qs := map[string]any{"depth": st.Depth, "bytes": st.Bytes, "oldest_age": oldest}
		if st.Err != nil {
			qs["error"] = "refusing QoS 1 messages after a disk error (retrying on a new segment): " + st.Err.Error()
		}
		return map[string]any{
			"link":   g.upstream.Status(),
			"queue":  qs,
			"parked": map[string]any{"depth": ps.Depth, "bytes": ps.Bytes},
		}
	})
	return nil
}

// controlUpstream is bastionctl's API for parked messages (see
// bridges/upstream: messages the broker refused for good).
func (g *Gateway) controlUpstream(mux *http.ServeMux) {
	link := func(w http.ResponseWriter) *upstream.Upstream {
		if g.upstream == nil {
			writeErr(w, fmt.Errorf("%w: the upstream link is off (upstream.enabled: false), so nothing is parked", ErrBadRequest))
		}
		return g.upstream
	}
	mux.HandleFunc("GET /v1/upstream/parked", func(w http.ResponseWriter, r *http.Request) {
		u := link(w)
		if u == nil {
			return
		}
		max := 100
		if s := r.URL.Query().Get("max"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 || n > 10000 {
				writeErr(w, fmt.Errorf("%w: max=%q: want a number from 0 to 10000", ErrBadRequest, s))
				return
			}
			max = n
		}
		p, err := u.ListParked(r.Context(), max)
		if err != nil {
			writeErr(w, err)
			return
		}
		writeJSON(w, http.StatusOK, p)
	})
	for _, op := range []string{"retry", "drop"} {
		mux.HandleFunc("POST /v1/upstream/parked/"+op, func(w http.ResponseWriter, r *http.Request) {
			u := link(w)
			if u == nil {
				return
			}
			f := u.RetryParked
			if op == "drop" {
				f = u.DropParked
			}
			n, err := f(r.Context())
			g.devices.audit(ctlActor, "upstream.parked."+op, "", fmt.Sprintf("count=%d", n)+errDetail(err))
			if err != nil {
				writeJSON(w, http.StatusConflict, map[string]any{"error": err.Error(), "count": n})
				return
			}
			writeJSON(w, http.StatusOK, map[string]any{"count": n})
		})
	}
}

func errDetail(err error) string {
	if err == nil {
		return ""
	}
	return " err=" + strconv.Quote(err.Error())
}

// deliverCommand hands a command from the cloud to the transports, only
// for a device of this gateway that is not revoked, and only if a device
// transport carries a command that large (commandLimit). The cloud names
// the device in the topic; without the check a command for an id that
// does not exist, or for a revoked device, would be kept as the device's
// last command (the hub keeps them for a device that observes later), for
// as many ids as the cloud sends, and would undo the hub's forgetting of a
// revoked device. The upstream link counts and logs the refusal (a command
// too large as result="too_large": upstream.ErrCommandTooLarge).
func (g *Gateway) deliverCommand(ctx context.Context, m bridges.Message) error {
	d, err := g.store.Device(m.Device)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("command for device %q: %w", m.Device, errNoSuchDevice)
	case err != nil:
		return fmt.Errorf("command for device %q: look up the device: %w", m.Device, err)
	case d.Revoked:
		return fmt.Errorf("command for device %q: the device is revoked", m.Device)
	}
	if limit, by := commandLimit(*g.cfg.Load(), m.Topic); len(m.Payload) > limit {
		return fmt.Errorf("command for device %q: a payload of %d bytes, over the %d the device transports carry (%s): %w", m.Device, len(m.Payload), limit, by, upstream.ErrCommandTooLarge)
	}
	if f := g.downlink.Load(); f != nil {
		return (*f)(ctx, m)
	}
	return errNoDownlink
}

// coapNotifyPayload is the largest command bridges/coap sends an observer
// in a notification (its maxNotifyPayload): one datagram.
const coapNotifyPayload = 1024

// mqttPublishOverhead is what an MQTT PUBLISH of a command adds to its
// topic and payload: a fixed header of at most 5 bytes, the topic's 2
// length bytes, a packet identifier (QoS 1) and an MQTT 5 property length.
const mqttPublishOverhead = 5 + 2 + 2 + 1

// commandLimit is the largest payload of a command on topic that a device
// transport of this gateway carries, and which one says so: each carries
// to devices what it takes from them. The MQTT listener, a PUBLISH within
// mqtt.max_packet_size (the Maximum Packet Size it announces to devices);
// CoAP, coap.max_payload (what its devices send), and at least one
// notification. A CoAP device could GET a larger one in Block2 blocks, but
// a command beyond what its own messages may be is not one it was built
// for. The largest of the enabled transports: the gateway does not know
// which one the device uses. Without the bound the cloud's commands could
// be as large as the link takes (256 KiB), each kept in memory as its
// topic's last command, 16 of them taking the hub's whole 4 MiB.
func commandLimit(cfg config.Config, topic string) (limit int, by string) {
	by = "none is enabled"
	if cfg.CoAP.Enabled {
		limit = max(cfg.CoAP.MaxPayload, coapNotifyPayload)
		by = fmt.Sprintf("CoAP: coap.max_payload %d, at least one notification of %d", cfg.CoAP.MaxPayload, coapNotifyPayload)
	}
	if n := cfg.MQTT.MaxPacketSize - mqttPublishOverhead - len(topic); cfg.MQTT.Enabled && n > limit {
		limit = n
		by = fmt.Sprintf("MQTT: a PUBLISH within mqtt.max_packet_size %d", cfg.MQTT.MaxPacketSize)
	}
	return limit, by
}

// errNoSuchDevice is returned for a command whose topic names an id that
// is not a device of this gateway.
var errNoSuchDevice = errors.New("no such device on this gateway (check the cloud's topic)")

// setDownlink sets where commands from the cloud go (the transports).
func (g *Gateway) setDownlink(f func(context.Context, bridges.Message) error) {
	g.downlink.Store(&f)
}

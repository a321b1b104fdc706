package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/gateway/config"
	"github.com/bastion-iot/bastion/internal/connlimit"
	otacache "github.com/bastion-iot/bastion/ota-cache"
	"github.com/bastion-iot/bastion/pki"
)

// coapFirmware is the firmware cache for the CoAP bridge, or nil (a nil
// *Cache in the interface would not read as "off").
func (g *Gateway) coapFirmware() coap.Firmware {
	if g.firmware == nil {
		return nil
	}
	return g.firmware
}

// firmwareHTTPS serves verified images over HTTPS to devices that speak
// MQTT: client certificate required and verified by the gateway CA, GET
// with Range only (otacache.HTTPHandler).
type firmwareHTTPS struct {
	ln  net.Listener
	srv *http.Server
}

// openFirmwareHTTPS binds firmware.https_listen when the cache is on.
func (g *Gateway) openFirmwareHTTPS(cfg config.Config, cert func(name, listen string) (*pki.ServerCert, error)) error {
	if g.firmware == nil || !cfg.Firmware.Enabled {
		return nil
	}
	sc, err := cert("firmware", cfg.Firmware.HTTPSListen)
	if err != nil {
		return err
	}
	id := g.identity()
	log := g.log.With("component", "firmware-https")
	// Anyone on the LAN can open connections that fail the handshake (a
	// certificate of any CA and CN, plaintext, none): each is counted, the
	// lines are spaced and the claimed id and error cut.
	refusals := g.newHTTPSRefusals("firmware", "firmware https", log, slog.LevelDebug)
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		dev, err := id.VerifyCert(raw)
		if err != nil {
			if dev == "" {
				dev = hub.ClaimedDevice(raw)
			}
			return refusals.cert(hub.CertRefusal(err), dev, err)
		}
		return nil
	}
	tcfg := pki.TLSServer(sc, tls.RequireAnyClientCert, verify)
	identify := func(r *http.Request) (string, bool) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			return "", false
		}
		raw := make([][]byte, len(r.TLS.PeerCertificates))
		for i, c := range r.TLS.PeerCertificates {
			raw[i] = c.Raw
		}
		// Verified again per request: a device revoked after its handshake
		// gets nothing more on a kept-alive connection.
		dev, err := id.VerifyCert(raw)
		return dev, err == nil && dev != ""
	}
	mux := http.NewServeMux()
	mux.Handle("/fw/", g.firmware.HTTPHandler(identify, otacache.HTTPLimits{WriteStall: fwWriteStall}))
	// The current offer, for an MQTT device that would rather ask than
	// subscribe (a subscriber gets it on subscribe too): GET only, as /fw/.
	mux.HandleFunc("/fw/offer", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", http.MethodGet)
			http.Error(w, "/fw/offer allows GET", http.StatusMethodNotAllowed)
			return
		}
		dev, ok := identify(r)
		if !ok {
			http.Error(w, "no authenticated device identity on this connection", http.StatusForbidden)
			return
		}
		o, ok := g.firmware.Offer(dev)
		if !ok {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(o)
	})
	ln, err := net.Listen("tcp", cfg.Firmware.HTTPSListen)
	if err != nil {
		return fmt.Errorf("firmware.https_listen %s: %w", cfg.Firmware.HTTPSListen, err)
	}
	// Bounded as connlimit.Listener says. A device holds its place among
	// the unauthenticated for the milliseconds of its handshake (ended
	// when net/http reads its first request, below), so what the closing
	// of the oldest pushes out is stalled connections, never a download in
	// progress or a device's connection kept alive. Claimed ones are not
	// bounded per address (fwMaxConns): only a device certificate claims
	// one, and each device has its own address.
	unauth := bridges.NewSourceLimit[net.Conn](fwMaxUnauthPerSource, fwMaxUnauthPerPrefix, fwMaxUnauth)
	limited := connlimit.New(ln, fwMaxConns, fwMaxConns, unauth, refusals.connEvents(unauth, fwMaxUnauthPerSource, fwMaxUnauthPerPrefix, fwMaxUnauth, fwMaxConns))
	g.firmwareHTTPS = &firmwareHTTPS{ln: tls.NewListener(limited, tcfg), srv: &http.Server{
		Handler: mux,
		// A connection whose first request net/http reads has passed
		// its handshake, which only a device certificate verify accepts
		// passes: it gives its place among the unauthenticated back.
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateActive {
				connlimit.Claim(c)
			}
		},
		ReadHeaderTimeout: 10 * time.Second,
		// Bounds every answer but an image's, whose writes each get
		// fwWriteStall afresh (otacache.HTTPLimits): a device that stops
		// reading is cut off, one on a slow link is not.
		WriteTimeout:   fwWriteStall,
		IdleTimeout:    2 * time.Minute,
		MaxHeaderBytes: 8 << 10,
		ErrorLog:       refusals.errorLog(),
	}}
	return nil
}

const (
	// fwWriteStall is how long a write to a firmware HTTPS client may make
	// no progress before its connection is closed (MQTT's write_timeout
	// default).
	fwWriteStall = 30 * time.Second
	// fwMaxConns bounds the firmware HTTPS listener's open connections
	// (each can hold a goroutine, TLS and HTTP buffers and an fd): past
	// it a new connection closes the oldest not authenticated yet, or is
	// closed at once if every open one is authenticated (connlimit).
	fwMaxConns = 256
	// fwMaxUnauthPerSource, fwMaxUnauthPerPrefix and fwMaxUnauth bound
	// the connections not authenticated yet (connlimit): from one
	// address (a new one past it closed), from one IPv6 /64 and in all
	// (past them the /64's, or all's, oldest closed). The total is half
	// of fwMaxConns, so that hosts that stall handshakes from many
	// addresses never hold more than half of the places.
	fwMaxUnauthPerSource = 8
	fwMaxUnauthPerPrefix = 32
	fwMaxUnauth          = 128
)

// Addr is the bound address of the firmware HTTPS listener.
func (f *firmwareHTTPS) Addr() net.Addr { return f.ln.Addr() }

func (f *firmwareHTTPS) run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- f.srv.Serve(f.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("firmware https: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.srv.Shutdown(sctx); err != nil {
		f.srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("firmware https: %w", err)
	}
	return nil
}

// FirmwareHTTPSAddr returns the firmware HTTPS listener's address, or nil.
func (g *Gateway) FirmwareHTTPSAddr() net.Addr {
	if g.firmwareHTTPS == nil {
		return nil
	}
	return g.firmwareHTTPS.Addr()
}

// offerQueue is the announcer's work: classes whose offer changed (told by
// the cache) and devices that just subscribed to their offer topic over
// MQTT (told by the broker). Producers record and return; they never block.
type offerQueue struct {
	mu      sync.Mutex
	classes map[otacache.Class]bool
	devices map[string]bool
	wake    chan struct{}
}

func newOfferQueue() *offerQueue {
	return &offerQueue{classes: map[otacache.Class]bool{}, devices: map[string]bool{}, wake: make(chan struct{}, 1)}
}

func (q *offerQueue) add(cl *otacache.Class, device string) {
	q.mu.Lock()
	if cl != nil {
		q.classes[*cl] = true
	}
	if device != "" {
		q.devices[device] = true
	}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *offerQueue) take() (map[otacache.Class]bool, map[string]bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	cls, devs := q.classes, q.devices
	q.classes, q.devices = map[otacache.Class]bool{}, map[string]bool{}
	return cls, devs
}

// offerSubscribed is the MQTT broker telling the gateway that a device now
// holds filter. A device that subscribes to its offer topic after the last
// announcement (it was offline, it rebooted) gets the offer in force now,
// and nothing if there is none (withdrawn, frozen metadata, already
// installed): the offer is computed at that moment, never replayed.
func (g *Gateway) offerSubscribed(device, filter string) {
	if filterMatches(filter, coap.OfferTopic(device)) {
		g.offers.add(nil, device)
	}
}

// filterMatches reports whether the MQTT topic filter f matches topic t
// ("+" is one level, a trailing "#" any number including none).
func filterMatches(f, t string) bool {
	fs, ts := strings.Split(f, "/"), strings.Split(t, "/")
	for i, seg := range fs {
		if seg == "#" {
			return i == len(fs)-1
		}
		if i >= len(ts) || (seg != "+" && seg != ts[i]) {
			return false
		}
	}
	return len(fs) == len(ts)
}

// runFirmwareAnnounce pushes each device's offer to its offer topic
// (devices/{id}/c/fw/offer: CoAP observers of /fw/offer and MQTT
// subscribers) whenever the cache says a class's offer changed, sends the
// current offer to a device that subscribes to that topic over MQTT, and
// takes MQTT status reports on devices/{id}/s/fw.
func (g *Gateway) runFirmwareAnnounce(ctx context.Context) error {
	// Subscribe's callback runs on the checking goroutine and must not
	// block: it only records the class.
	cancel := g.firmware.Subscribe(func(cl otacache.Class) { g.offers.add(&cl, "") })
	defer cancel()
	// Status reports arrive as device telemetry on devices/{id}/s/fw; the
	// hub passes them on while the device still waits for its PUBACK, so a
	// report is recorded before the device hears it was accepted.
	g.hub.AddMirror("firmware", g.firmwareStatusMirror)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-g.offers.wake:
		}
		classes, devices := g.offers.take()
		if len(classes) > 0 {
			g.announceOffers(ctx, classes)
		}
		for _, d := range slices.Sorted(maps.Keys(devices)) {
			g.sendOffer(ctx, d, "subscribe")
		}
	}
}

// statusTopic is where a device publishes firmware status reports (the
// JSON of otacache.DeviceStatus), over MQTT: devices/{id}/s/fw.
func statusTopic(device string) string { return bridges.TopicPrefix(device) + hub.ClassStatus + "/fw" }

func (g *Gateway) announceOffers(ctx context.Context, classes map[otacache.Class]bool) {
	ds, err := g.store.Devices()
	if err != nil {
		g.log.Error("firmware: offers not announced: device list unreadable", "err", err)
		return
	}
	for _, d := range ds {
		if d.Revoked || !classes[otacache.Class{Vendor: d.Vendor, Model: d.Model}] {
			continue
		}
		g.sendOffer(ctx, d.ID, "change")
	}
}

// sendOffer delivers the device's current offer, if it has one, on its
// offer topic; trigger (change, subscribe) says why, for the log and
// bastion_firmware_offers_total. When a change leaves the device without an
// offer (freeze alarm, newest image already installed) it sends an empty
// payload, which means "nothing is offered now" (as an empty /fw/offer
// does): a device that already holds the old offer hears it is withdrawn,
// and a plain CoAP GET of the command path no longer returns it. A new
// subscriber with nothing to be offered gets nothing.
func (g *Gateway) sendOffer(ctx context.Context, device, trigger string) {
	o, ok := g.firmware.Offer(device)
	if !ok && trigger != "change" {
		g.metrics.offers.WithLabelValues(trigger, "none").Inc()
		return
	}
	var b []byte
	var err error
	if ok {
		b, err = json.Marshal(o)
	}
	if err == nil {
		err = g.hub.Deliver(ctx, bridges.Message{Device: device, Topic: coap.OfferTopic(device), Payload: b, QoS: 1})
	}
	if err != nil {
		g.metrics.offers.WithLabelValues(trigger, "failed").Inc()
		g.log.Warn("firmware: offer not delivered", "device", device, "trigger", trigger, "err", err)
		return
	}
	if !ok {
		g.metrics.offers.WithLabelValues(trigger, "withdrawn").Inc()
		g.log.Info("firmware: no offer in force; withdrawal sent", "device", device, "trigger", trigger)
		return
	}
	g.metrics.offers.WithLabelValues(trigger, "sent").Inc()
	g.log.Info("firmware: offer announced", "device", device, "trigger", trigger, "version", o.Version, "sha256", o.SHA256)
}

// firmwareStatusMirror takes a status report a device published on its
// own devices/{id}/s/fw; m.Device is the identity the transport proved.
// It is no device's session: it never reports a command as received.
func (g *Gateway) firmwareStatusMirror(m bridges.Message) bool {
	if m.Device == "" || m.Topic != statusTopic(m.Device) {
		return false
	}
	st, err := otacache.ParseStatusReport(m.Payload)
	if err == nil {
		err = g.firmware.ReportStatus(m.Device, st)
	}
	// Counted as a refusal only when it is the device's (the cache
	// decides); one taken but not stored is the gateway's disk, and it
	// was logged as refused.
	g.firmware.StatusReportRefused(err)
	switch {
	case otacache.StatusNotStored(err):
		g.log.Error("firmware: mqtt status report taken but not stored (the gateway's store failed); shown, and stored with the device's next report", "device", m.Device, "err", err)
	case err != nil:
		g.log.Info("firmware: mqtt status report refused", "device", m.Device, "err", err)
	}
	return false
}

// Firmware returns the firmware cache, or nil when firmware.enabled is false.
func (g *Gateway) Firmware() *otacache.Cache { return g.firmware }

package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/bastion-iot/bastion/bridges"
	"github.com/bastion-iot/bastion/bridges/coap"
	"github.com/bastion-iot/bastion/bridges/hub"
	"github.com/bastion-iot/bastion/gateway/config"
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
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		dev, err := id.VerifyCert(raw)
		if err != nil {
			log.Warn("firmware https: handshake refused: device certificate not accepted", "device", dev, "err", err)
		}
		return err
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
	mux.Handle("/fw/", g.firmware.HTTPHandler(identify))
	// The current offer for an MQTT device that connects after the last
	// announcement (MQTT offers are not retained): GET only, as /fw/.
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
	g.firmwareHTTPS = &firmwareHTTPS{ln: tls.NewListener(ln, tcfg), srv: &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}}
	return nil
}

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

// runFirmwareAnnounce pushes each device's offer to its offer topic
// (devices/{id}/c/fw/offer: CoAP observers of /fw/offer and MQTT
// subscribers) whenever the cache says a class's offer changed, and takes
// MQTT status reports on devices/{id}/s/fw.
func (g *Gateway) runFirmwareAnnounce(ctx context.Context) error {
	var (
		mu      sync.Mutex
		pending = map[otacache.Class]bool{}
		wake    = make(chan struct{}, 1)
	)
	// Subscribe's callback runs on the checking goroutine and must not
	// block: it only records the class.
	cancel := g.firmware.Subscribe(func(cl otacache.Class) {
		mu.Lock()
		pending[cl] = true
		mu.Unlock()
		select {
		case wake <- struct{}{}:
		default:
		}
	})
	defer cancel()
	// Status reports arrive as device telemetry on devices/{id}/s/fw; the
	// hub passes them on while the device still waits for its PUBACK, so a
	// report is recorded before the device hears it was accepted.
	g.hub.AddMirror("firmware", g.firmwareStatusMirror)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		}
		mu.Lock()
		classes := pending
		pending = map[otacache.Class]bool{}
		mu.Unlock()
		g.announceOffers(ctx, classes)
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
		o, ok := g.firmware.Offer(d.ID)
		if !ok {
			continue
		}
		b, err := json.Marshal(o)
		if err != nil {
			continue
		}
		if err := g.hub.Deliver(ctx, bridges.Message{Device: d.ID, Topic: coap.OfferTopic(d.ID), Payload: b, QoS: 1}); err != nil {
			g.log.Warn("firmware: offer not delivered", "device", d.ID, "err", err)
			continue
		}
		g.log.Info("firmware: offer announced", "device", d.ID, "version", o.Version, "sha256", o.SHA256)
	}
}

// firmwareStatusMirror takes a status report a device published on its
// own devices/{id}/s/fw; m.Device is the identity the transport proved.
func (g *Gateway) firmwareStatusMirror(m bridges.Message) {
	if m.Device == "" || m.Topic != statusTopic(m.Device) {
		return
	}
	st, err := otacache.ParseStatusReport(m.Payload)
	if err == nil {
		err = g.firmware.ReportStatus(m.Device, st)
	}
	if err != nil {
		g.log.Info("firmware: mqtt status report refused", "device", m.Device, "err", err)
	}
}

// Firmware returns the firmware cache, or nil when firmware.enabled is false.
func (g *Gateway) Firmware() *otacache.Cache { return g.firmware }

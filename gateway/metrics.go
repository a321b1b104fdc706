package gateway

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the gateway core's own; each component registers its own on
// the same registry. No global registry: two gateways in one test process
// do not collide.
type metrics struct {
	reg          *prometheus.Registry
	authFailures *prometheus.CounterVec
	reloads      *prometheus.CounterVec
	devices      prometheus.GaugeFunc
	clockSane    prometheus.Gauge
	// offers counts firmware offers the gateway computed for a device, by
	// trigger (change: the class's offer changed; subscribe: the device
	// subscribed to its offer topic over MQTT) and result (sent, none,
	// failed).
	offers *prometheus.CounterVec
	// renewals counts EST /sren requests by result (renewal.go).
	renewals *prometheus.CounterVec
	// httpsRefusals counts the TLS handshakes the gateway's own HTTPS
	// servers refused or saw fail, by server (firmware, est, console) and
	// reason (httpsrefusals.go).
	httpsRefusals *prometheus.CounterVec
}

func newMetrics(deviceCount func() float64) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		reg: reg,
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_device_auth_failures_total",
			Help: "Device authentications refused, by reason.",
		}, []string{"reason"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_config_reloads_total",
			Help: "Configuration reloads, by result (ok, refused).",
		}, []string{"result"}),
		devices: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "bastion_devices",
			Help: "Devices known to the gateway, revoked ones excluded.",
		}, deviceCount),
		clockSane: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "bastion_clock_sane",
			Help: "1 when the wall clock is plausible and certificates can be judged.",
		}),
		offers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_firmware_offers_total",
			Help: "Firmware offers computed for a device, by trigger (change, subscribe) and result (sent, none, failed).",
		}, []string{"trigger", "result"}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_device_cert_renewals_total",
			Help: "EST /sren certificate renewals, by result (issued, resent, refused, expired, revoked, retired, superseded, rate_limited, store_failed).",
		}, []string{"result"}),
		httpsRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bastion_https_handshake_refusals_total",
			Help: "TLS handshakes refused or failed on the gateway's HTTPS servers, by server (firmware, est, console) and reason (wrong_ca, cert_expired, bad_certificate, revoked, cert_retired, clock_not_set, pairing_refused, plaintext, no_credentials, handshake_failed; conn_limit: a new firmware or console connection closed before its handshake, the listener being full of authenticated (console: signed-in) ones; handshake_limit: a firmware connection closed before it authenticated, or a console connection before a valid session was seen on it, too many such from its address, its IPv6 /64 or in all, or the oldest such closed for a new one, the listener being full).",
		}, []string{"server", "reason"}),
	}
	reg.MustRegister(m.renewals, m.httpsRefusals, m.authFailures, m.reloads, m.devices, m.clockSane, m.offers,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

package gateway

import (
	otacache "github.com/bastion-iot/bastion/ota-cache"
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

// firmwareCollector exports the firmware cache's counters and its freeze
// alarm at scrape time: the cache's Status is the single source, read once
// per scrape.
type firmwareCollector struct {
	status   func() otacache.Status
	refusals *prometheus.Desc
	frozen   *prometheus.Desc
}

func newFirmwareCollector(c *otacache.Cache) *firmwareCollector {
	return &firmwareCollector{
		status: c.Status,
		refusals: prometheus.NewDesc("bastion_firmware_refusals_total",
			"Bad firmware and firmware requests refused, by reason: check_failed (a repository check failed: refused or expired metadata, a refused target, or the link), "+
				"target_refused (a target refused in a check: bad metadata, bad image, rollback, too large; counted again at every check that still finds it), "+
				"serve_refused (a download request refused), serve_cut (an HTTPS transfer ended before its last byte), status_refused (a device's status report refused).",
			[]string{"reason"}, nil),
		frozen: prometheus.NewDesc("bastion_firmware_frozen",
			"1 while the vendor's TUF metadata has expired or was never fetched (possible freeze attack): no update is offered or served.", nil, nil),
	}
}

func (c *firmwareCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.refusals
	ch <- c.frozen
}

func (c *firmwareCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.status()
	k := st.Counters
	for reason, n := range map[string]uint64{
		"check_failed": k.CheckFailures, "target_refused": k.TargetsRefused, "serve_refused": k.ServeRefused,
		"serve_cut": k.ServeCut, "status_refused": k.StatusRefused,
	} {
		ch <- prometheus.MustNewConstMetric(c.refusals, prometheus.CounterValue, float64(n), reason)
	}
	frozen := 0.0
	if st.Frozen {
		frozen = 1
	}
	ch <- prometheus.MustNewConstMetric(c.frozen, prometheus.GaugeValue, frozen)
}

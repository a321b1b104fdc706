package upstream

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	connected          prometheus.Gauge
	published          prometheus.Counter
	publishErrors      prometheus.Counter
	connectErrors      prometheus.Counter
	withheld           *prometheus.CounterVec
	withheldQueued     *prometheus.CounterVec
	refused            *prometheus.CounterVec
	parked             *prometheus.CounterVec
	parkedDepth        prometheus.GaugeFunc // set by New: it reads the parking queue
	downlink           *prometheus.CounterVec
	downlinkSubscribed prometheus.Gauge
	subscribeErrors    prometheus.Counter
	reloads            *prometheus.CounterVec
	certExpiry         prometheus.Gauge
}

func newMetrics() *metrics {
	return &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_upstream_connected",
			Help: "1 while the upstream MQTT connection is up."}),
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_upstream_published_total",
			Help: "Messages acknowledged by the upstream broker (and then deleted from the queue)."}),
		publishErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_upstream_publish_errors_total",
			Help: "Publishes that failed or were refused by the broker (the message stays queued)."}),
		connectErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_upstream_connect_errors_total",
			Help: "Failed connection attempts to the upstream broker."}),
		withheld: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_withheld_total",
			Help: "Messages kept local, by reason (no_rule, local, redact_not_json, redact_not_object, unmapped)."}, []string{"reason"}),
		withheldQueued: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_withheld_queued_total",
			Help: "Of the withheld messages, those deleted from the queue when due to be sent (accepted and acknowledged to their device before a reload changed the mapping or the privacy rules), by reason."}, []string{"reason"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_refused_total",
			Help: "Messages refused to their device at admission, nothing stored, by reason (topic_too_long, topic_too_deep: the upstream topic is beyond upstream.max_topic_length, max_topic_levels; the device is told it is a bad topic; device_stalled: the device's oldest queued message can be neither sent nor parked, so its new ones would only wait behind it; rules_unreadable: the gateway cannot read its privacy rules, so nothing is sent or deleted (upstream.ActionHold); for both the device is told the queue is full)."}, []string{"reason"}),
		parked: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_parked_total",
			Help: "Messages the broker refused for good, or would, moved to the parking queue, by reason (the broker's PUBACK: not_authorized, topic_name_invalid, packet_too_large, payload_format_invalid; found by the link: topic_too_long, topic_too_deep (upstream.max_topic_length, max_topic_levels), connection_closed (the broker closed the connection on it 3 times in a row))."}, []string{"reason"}),
		downlink: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_downlink_total",
			Help: "Downlink commands by result (delivered: a device session received it; no_receiver: kept for the device, none received it; too_large: refused, larger than the device transports carry; refused, loop, unmapped, retained: replayed from the broker's store, dropped; packet_too_large, malformed_packet: a packet from the broker beyond the Maximum Packet Size the link announced, or whose length does not decode, not read: the link closed the connection)."}, []string{"result"}),
		downlinkSubscribed: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_upstream_downlink_subscribed",
			Help: "1 while the broker has granted every downlink (command) subscription on the current connection; 0: commands are lost."}),
		subscribeErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_upstream_subscribe_errors_total",
			Help: "Downlink SUBSCRIBEs refused or not answered by the broker (each is asked again while connected)."}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_upstream_reloads_total",
			Help: "Configuration reloads by result (ok, refused)."}, []string{"result"}),
		certExpiry: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_upstream_client_cert_expiry_timestamp_seconds",
			Help: "NotAfter of the client certificate in use (Unix seconds)."}),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.connected, m.published, m.publishErrors, m.connectErrors, m.withheld, m.withheldQueued, m.refused, m.parked, m.parkedDepth, m.downlink, m.downlinkSubscribed, m.subscribeErrors, m.reloads, m.certExpiry} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

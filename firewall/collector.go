package firewall

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// dropCollector exports DropCounters at scrape time, so the kernel's own
// counters are the single source (nothing to keep in sync). They restart
// from zero when a reload builds a new chain, which Prometheus treats as a
// counter reset.
type dropCollector struct {
	f       *Firewall
	packets *prometheus.Desc
	bytes   *prometheus.Desc
}

func newDropCollector(f *Firewall) *dropCollector {
	labels := []string{"family", "rule"}
	return &dropCollector{
		f: f,
		packets: prometheus.NewDesc("bastion_firewall_dropped_packets_total",
			"Packets dropped by Bastion's rules, by family and rule (invalid, ratelimit:<service>, default-drop, fwd-...).", labels, nil),
		bytes: prometheus.NewDesc("bastion_firewall_dropped_bytes_total",
			"Bytes dropped by Bastion's rules, by family and rule.", labels, nil),
	}
}

func (c *dropCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
}

func (c *dropCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	drops, err := c.f.DropCounters(ctx)
	if err != nil {
		c.f.log.Warn("firewall drop counters unavailable for metrics", "err", err)
		ch <- prometheus.NewInvalidMetric(c.packets, err)
		return
	}
	// Several rules may share a label (one per interface): sum them.
	type key struct{ fam, label string }
	pk, by := map[key]uint64{}, map[key]uint64{}
	for _, d := range drops {
		k := key{d.Family.String(), d.Label}
		pk[k] += d.Packets
		by[k] += d.Bytes
	}
	for k, v := range pk {
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v), k.fam, k.label)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(by[k]), k.fam, k.label)
	}
}

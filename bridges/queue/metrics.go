package queue

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	depth    prometheus.Gauge
	bytes    prometheus.Gauge
	oldest   prometheus.GaugeFunc
	refused  *prometheus.CounterVec
	fsyncs   prometheus.Counter
	fsyncSec prometheus.Counter
	accepted prometheus.Counter
	acked    prometheus.Counter
	cut      prometheus.Counter
	reg      prometheus.Registerer
}

func newMetrics(q *Queue) *metrics {
	return &metrics{
		depth: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_queue_depth",
			Help: "Messages held in the durable queue, not yet acknowledged upstream."}),
		bytes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_queue_bytes",
			Help: "Bytes of queue segments on disk."}),
		oldest: prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "bastion_queue_oldest_age_seconds",
			Help: "Age of the oldest held message (0 when empty)."}, func() float64 {
			s := q.Stats()
			if s.Oldest.IsZero() {
				return 0
			}
			return q.opts.Now().Sub(s.Oldest).Seconds()
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "bastion_queue_refusals_total",
			Help: "Messages refused by the queue, by reason (bytes, age, too_large, disk_full)."}, []string{"reason"}),
		fsyncs: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_fsyncs_total",
			Help: "fsync calls made by the queue (one per group-commit batch)."}),
		fsyncSec: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_fsync_seconds_total",
			Help: "Time spent in group-commit fsyncs (divided by bastion_queue_fsyncs_total: the mean commit latency of the disk)."}),
		accepted: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_accepted_total",
			Help: "Messages written to the queue."}),
		acked: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_acked_total",
			Help: "Messages removed after an upstream acknowledgement."}),
		cut: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_records_cut_total",
			Help: "Segment tails cut at open because a record was torn or corrupt."}),
	}
}

func (m *metrics) all() []prometheus.Collector {
	return []prometheus.Collector{m.depth, m.bytes, m.oldest, m.refused, m.fsyncs, m.fsyncSec, m.accepted, m.acked, m.cut}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	var done []prometheus.Collector
	for _, c := range m.all() {
		if err := reg.Register(c); err != nil {
			for _, d := range done {
				reg.Unregister(d)
			}
			return err
		}
		done = append(done, c)
	}
	m.reg = reg
	return nil
}

func (m *metrics) unregister() {
	if m.reg == nil {
		return
	}
	for _, c := range m.all() {
		m.reg.Unregister(c)
	}
}

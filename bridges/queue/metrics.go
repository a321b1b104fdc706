package queue

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	depth      prometheus.Gauge
	bytes      prometheus.Gauge
	oldest     prometheus.GaugeFunc
	refused    *prometheus.CounterVec
	fsyncs     prometheus.Counter
	fsyncSec   prometheus.Histogram
	accepted   prometheus.Counter
	acked      prometheus.Counter
	cut        prometheus.Counter
	skipped    prometheus.Counter
	unreadable prometheus.Counter
	lost       prometheus.Counter
	stopped    prometheus.Gauge
	// compactions and moved: see compact.
	compactions prometheus.Counter
	moved       prometheus.Counter
	reg         prometheus.Registerer
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
			Help: "Messages refused by the queue, by reason (bytes, age, too_large, device_share: the device holds its share of the queue, MaxDeviceBytes, in messages not yet delivered; disk_full: a write that found the disk full, or the queue stopped after one; disk_error: a failed write, rotation or fsync, or the queue stopped after one; of a failed fsync's batch only the messages whose Accept reports it)."}, []string{"reason"}),
		fsyncs: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_fsyncs_total",
			Help: "fsync calls made by the queue: one per group-commit batch, two per new segment (the file and its directory), one per compaction, and one per open (the directory, after moving the sequence floor)."}),
		// A histogram, not only a sum: a disk whose mean commit is quick
		// but whose every hundredth stalls for milliseconds (an SD card's
		// garbage collection, a busy host's flush) holds every device
		// waiting on that commit, and only the buckets show it.
		fsyncSec: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "bastion_queue_fsync_seconds",
			Help:    "Duration of group-commit fsyncs (_sum over _count: the disk's mean commit latency; the buckets: its tail).",
			Buckets: []float64{50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 1}}),
		accepted: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_accepted_total",
			Help: "Messages the queue took: QoS 0 once written, QoS 1 once fsynced (when Accept reports success). With bastion_queue_refusals_total, every message offered to an open queue is counted once."}),
		acked: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_acked_total",
			Help: "Messages removed after an upstream acknowledgement."}),
		cut: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_records_cut_total",
			Help: "Segment tails cut at open because a record was torn or corrupt."}),
		skipped: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_corrupt_skipped_total",
			Help: "Corrupt or unreadable stretches skipped at open because valid messages follow them (the disk's corruption, or a torn last batch that reached the disk out of order); the records after each were kept."}),
		unreadable: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_unreadable_bytes_total",
			Help: "Bytes of queue segments the disk could not read at open (EIO); the messages around them were kept."}),
		stopped: prometheus.NewGauge(prometheus.GaugeOpts{Name: "bastion_queue_stopped",
			Help: "1 while a failed write, rotation or fsync has stopped the queue from accepting messages (it tries a new segment after 10 s, longer while the disk keeps failing, up to 5 min), else 0."}),
		compactions: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_compactions_total",
			Help: "Times the queue copied the held messages of its oldest segment forward (durably) and removed that segment, with the segments of delivered records behind it, when they took half of the queue's bytes or more."}),
		moved: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_moved_total",
			Help: "Held messages copied forward by those compactions (a message moved twice counts twice)."}),
		lost: prometheus.NewCounter(prometheus.CounterOpts{Name: "bastion_queue_unreadable_dropped_total",
			Help: "Held messages dropped because, when they were due upstream, the disk could not read them (EIO, for 10 minutes) or their record no longer decoded (corruption)."}),
	}
}

func (m *metrics) all() []prometheus.Collector {
	return []prometheus.Collector{m.depth, m.bytes, m.oldest, m.refused, m.fsyncs, m.fsyncSec, m.accepted, m.acked, m.cut, m.skipped, m.unreadable, m.lost, m.stopped, m.compactions, m.moved}
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

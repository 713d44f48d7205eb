package replication

import "github.com/prometheus/client_golang/prometheus"

// metrics are the replication layer's counters, built unregistered; cmd
// registers them (Manager.Collectors).
type metrics struct {
	// reads counts bytes read through a Forwarder by where they came from:
	// "local" (this node's in-sync copy) or "writer" (over the network).
	reads *prometheus.CounterVec
	// servedReads counts bytes this writer read for other nodes.
	servedReads *prometheus.CounterVec
	// forwardedWrites counts bytes written through a Forwarder.
	forwardedWrites *prometheus.CounterVec
	// sent counts write payload bytes a writer sent to a copy, by kind:
	// "live" (client writes) or "resync".
	sent *prometheus.CounterVec
	// copyReceived counts write payload bytes a copy received, by kind.
	copyReceived *prometheus.CounterVec
	// staleRefused counts requests a copy refused for a stale epoch.
	staleRefused *prometheus.CounterVec
	// dirty is the bytes a copy lacks, as the writer knows them, read at
	// scrape time from every Mirror.
	dirty *prometheus.Desc
}

func newMetrics() *metrics {
	return &metrics{
		reads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_read_bytes_total",
			Help: "Bytes read through a non-writer node, by source: local (its own in-sync copy) or writer (over the network).",
		}, []string{"lu", "source"}),
		servedReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_served_read_bytes_total",
			Help: "Bytes this node, as writer, read for other nodes over replication streams.",
		}, []string{"lu"}),
		forwardedWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_forwarded_write_bytes_total",
			Help: "Bytes written through this node and forwarded to the LU's writer.",
		}, []string{"lu"}),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_sent_bytes_total",
			Help: "Write payload bytes this writer sent to a copy, by kind: live or resync.",
		}, []string{"lu", "copy", "kind"}),
		copyReceived: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_received_bytes_total",
			Help: "Write payload bytes this node's copy received from the writer, by kind: live or resync.",
		}, []string{"lu", "kind"}),
		staleRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_stale_epoch_refused_total",
			Help: "Requests this node's copy refused because they carried a stale epoch.",
		}, []string{"lu"}),
		dirty: prometheus.NewDesc("lupool_replication_dirty_bytes",
			"Bytes a copy lacks (resync still to send), as its writer knows them.", []string{"lu", "copy"}, nil),
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.reads, m.servedReads, m.forwardedWrites, m.sent, m.copyReceived, m.staleRefused}
}

// copyCollector reports, at scrape time, each copy's state and dirty bytes
// for the LUs this node writes.
type copyCollector struct {
	m     *Manager
	state *prometheus.Desc
}

func (c copyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.m.metrics.dirty
	ch <- c.state
}

func (c copyCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	var mirrors []*Mirror
	for _, d := range c.m.mu.devices {
		if mir, ok := d.(*Mirror); ok {
			mirrors = append(mirrors, mir)
		}
	}
	c.m.mu.Unlock()
	for _, mi := range mirrors {
		for _, l := range mi.linkSet() {
			ch <- prometheus.MustNewConstMetric(c.m.metrics.dirty, prometheus.GaugeValue, float64(l.dirty.dirtyBytes()), mi.name, l.node)
			st := copyState(l.state.Load())
			for _, s := range []copyState{stInSync, stResyncing, stOutOfSync, stNew} {
				v := 0.0
				if s == st {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, v, mi.name, l.node, s.replicaState())
			}
		}
	}
}

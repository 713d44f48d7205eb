package replication

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/cluster"
)

// metrics are the replication layer's counters, built unregistered; cmd
// registers them (Manager.Collectors).
//
// # Per-LU series
//
// Every series is labelled with its LU. A series exists only while the LU
// is in the manager's latest records (Manager.recs): children are resolved
// (Manager.luCounter) and deleted (forgetLU, forgetCopy) with recs locked,
// right where a record is replaced or removed. A device, stream or resync
// still running with children resolved before its LU was deleted counts
// into children no registry reports; none of them resolves children again
// for a name recs does not hold, so a deleted LU's series never come back.
// Likewise the "copy" series of a copy removed from an LU, and this node's
// received-bytes series once its copy is removed.
type metrics struct {
	// reads counts bytes read through a Forwarder by where they came from:
	// "local" (this node's in-sync copy) or "writer" (over the network).
	reads *prometheus.CounterVec
	// servedReads counts bytes this writer read for other nodes.
	servedReads *prometheus.CounterVec
	// forwardedWrites counts bytes written through a Forwarder.
	forwardedWrites *prometheus.CounterVec
	// failoverRetries counts forwarded requests sent again while the
	// writer was unreachable or moving.
	failoverRetries *prometheus.CounterVec
	// sent counts write payload bytes a writer sent to a copy, by kind:
	// "live" (client writes) or "resync".
	sent *prometheus.CounterVec
	// copyReceived counts write payload bytes a copy received, by kind.
	copyReceived *prometheus.CounterVec
	// staleRefused counts requests a copy refused for a stale epoch.
	staleRefused *prometheus.CounterVec
	// checksumRefused counts frames whose payload failed its CRC-32C,
	// refused unapplied (on a stream this node served) or failed (a reply
	// this node received).
	checksumRefused *prometheus.CounterVec
	// dirty is the bytes a copy lacks, as the writer knows them, read at
	// scrape time from every Mirror.
	dirty *prometheus.Desc
	// discard stands in for the child of an LU (or copy) that is gone:
	// counted, never reported.
	discard prometheus.Counter
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
		failoverRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_failover_retries_total",
			Help: "Forwarded requests this node sent again because the writer was unreachable or moving to another node.",
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
		checksumRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_replication_checksum_errors_total",
			Help: "Replication frames whose payload failed its CRC-32C check and were refused (never applied), by side: served (a request this node received) or reply (a reply it received).",
		}, []string{"lu", "side"}),
		dirty: prometheus.NewDesc("lupool_replication_dirty_bytes",
			"Bytes a copy lacks (resync still to send), as its writer knows them.", []string{"lu", "copy"}, nil),
		discard: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lupool_replication_discarded", Help: "Never registered.",
		}),
	}
}

// perLU returns every counter vector labelled with an LU.
func (m *metrics) perLU() []*prometheus.CounterVec {
	return []*prometheus.CounterVec{m.reads, m.servedReads, m.forwardedWrites, m.failoverRetries, m.sent, m.copyReceived, m.staleRefused, m.checksumRefused}
}

// forgetLU deletes every series of the LU. Manager.recs must be held.
func (m *metrics) forgetLU(name string) {
	for _, v := range m.perLU() {
		v.DeletePartialMatch(prometheus.Labels{"lu": name})
	}
}

// forgetCopy deletes the series of node's copy of the LU: on the writer
// what it sent the copy, on the copy's own node what it received.
// Manager.recs must be held.
func (m *metrics) forgetCopy(name, node string, self bool) {
	m.sent.DeletePartialMatch(prometheus.Labels{"lu": name, "copy": node})
	if self {
		m.copyReceived.DeletePartialMatch(prometheus.Labels{"lu": name})
	}
}

// setRecordLocked makes rec the latest record of its LU and deletes the
// series of copies the previous record had and rec has not. m.recs must be
// held.
func (m *Manager) setRecordLocked(rec cluster.LU) {
	if old, ok := m.recs.m[rec.Name]; ok {
		for _, r := range old.Replicas {
			if !holdsCopy(rec, r.NodeID) {
				m.metrics.forgetCopy(rec.Name, r.NodeID, r.NodeID == m.opts.NodeID)
			}
		}
	}
	m.recs.m[rec.Name] = rec
}

// luCounter returns the child of vec for labels, whose first is an LU
// name, while that LU is in the latest records and holds (if non-nil)
// accepts its record; otherwise a counter that is never reported. See
// "Per-LU series" on metrics.
func (m *Manager) luCounter(vec *prometheus.CounterVec, holds func(cluster.LU) bool, labels ...string) prometheus.Counter {
	m.recs.Lock()
	defer m.recs.Unlock()
	rec, ok := m.recs.m[labels[0]]
	if !ok || (holds != nil && !holds(rec)) {
		return m.metrics.discard
	}
	return vec.WithLabelValues(labels...)
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.reads, m.servedReads, m.forwardedWrites, m.failoverRetries, m.sent, m.copyReceived, m.staleRefused, m.checksumRefused}
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

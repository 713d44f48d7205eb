package nbd

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lupool/lupool/server/nbdproto"
)

// Metrics are the engine's Prometheus collectors, built unregistered; the
// embedding program registers Collectors on its own registry. One Metrics
// may be shared by several servers.
//
// The per-export series live until ForgetExport: a connection resolves its
// export's children once, when transmission starts, and only while the
// export is still in its server's ExportSource, so a connection that
// outlives ForgetExport counts into children no registry reports any more
// and never brings the export's series back.
type Metrics struct {
	// mu serializes resolving an export's children (forExport) with
	// deleting them (ForgetExport).
	mu sync.Mutex

	requests    *prometheus.CounterVec   // export, command
	errors      *prometheus.CounterVec   // export, command
	bytes       *prometheus.CounterVec   // export, command
	duration    *prometheus.HistogramVec // export, command
	inflight    *prometheus.GaugeVec     // export
	connections *prometheus.GaugeVec     // export
	// open counts every accepted connection, negotiating ones included.
	open prometheus.Gauge
	// refused counts connections refused at a limit, by reason; the two
	// children are resolved once.
	refused       *prometheus.CounterVec // reason
	refusedServer prometheus.Counter     // reason server_limit
	refusedExport prometheus.Counter     // reason export_limit
}

// Reasons for lupool_nbd_connections_refused_total.
const (
	// RefusedServerLimit: the server had Options.MaxConnections
	// connections; closed right after accept.
	RefusedServerLimit = "server_limit"
	// RefusedExportLimit: the export had Options.MaxConnectionsPerExport
	// connections; NBD_OPT_GO refused, or NBD_OPT_EXPORT_NAME closed.
	RefusedExportLimit = "export_limit"
)

// NewMetrics builds unregistered collectors.
func NewMetrics() *Metrics {
	cmd := []string{"export", "command"}
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_nbd_requests_total", Help: "NBD requests completed, by export and command.",
		}, cmd),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_nbd_request_errors_total", Help: "NBD requests answered with an error, by export and command.",
		}, cmd),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_nbd_bytes_total", Help: "Payload bytes of successful NBD reads and writes.",
		}, cmd),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "lupool_nbd_request_duration_seconds", Help: "NBD request latency from decoded header to reply.",
			// 10 µs to about 10 s.
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 11),
		}, cmd),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lupool_nbd_inflight_requests", Help: "NBD requests in flight, by export.",
		}, []string{"export"}),
		connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "lupool_nbd_connections", Help: "NBD connections in transmission, by export.",
		}, []string{"export"}),
		open: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lupool_nbd_open_connections", Help: "NBD connections accepted and not yet ended, negotiating ones included.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_nbd_connections_refused_total",
			Help: "NBD connections refused at a connection limit, by reason (server_limit, export_limit).",
		}, []string{"reason"}),
	}
	m.refusedServer = m.refused.WithLabelValues(RefusedServerLimit)
	m.refusedExport = m.refused.WithLabelValues(RefusedExportLimit)
	return m
}

// Collectors returns every collector for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.errors, m.bytes, m.duration, m.inflight, m.connections, m.open, m.refused}
}

// numCommands covers every command code the engine counts (0..CmdBlockStatus).
const numCommands = int(nbdproto.CmdBlockStatus) + 1

// commandMetrics are one export's children for one command, resolved once
// per connection so the hot path does no label lookup.
type commandMetrics struct {
	requests prometheus.Counter
	errors   prometheus.Counter
	bytes    prometheus.Counter
	duration prometheus.Observer
}

// exportMetrics are the resolved children for one connection's export.
// Immutable once built.
type exportMetrics struct {
	commands    [numCommands]commandMetrics // index by command; disc has none
	inflight    prometheus.Gauge
	connections prometheus.Gauge
}

// ForgetExport deletes every series labelled with export. Call it once the
// export is gone from the ExportSource of every server sharing m (the
// daemon: after the LU is deleted); a connection attached before then keeps
// counting, into children that are no longer reported, and one that starts
// transmission afterwards is not counted at all.
func (m *Metrics) ForgetExport(export string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	match := prometheus.Labels{"export": export}
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{m.requests, m.errors, m.bytes, m.duration, m.inflight, m.connections} {
		v.DeletePartialMatch(match)
	}
}

// forExport resolves export's children, or returns nil when current (asked
// under m.mu, so that no ForgetExport runs between the question and the
// resolution) reports that the export is gone.
func (m *Metrics) forExport(export string, current func() bool) *exportMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !current() {
		return nil
	}
	em := &exportMetrics{
		inflight:    m.inflight.WithLabelValues(export),
		connections: m.connections.WithLabelValues(export),
	}
	for c := range uint16(numCommands) {
		if c == nbdproto.CmdDisc {
			continue
		}
		name := nbdproto.CommandName(c)
		em.commands[c] = commandMetrics{
			requests: m.requests.WithLabelValues(export, name),
			errors:   m.errors.WithLabelValues(export, name),
			bytes:    m.bytes.WithLabelValues(export, name),
			duration: m.duration.WithLabelValues(export, name),
		}
	}
	return em
}

package endpoint

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the endpoint's Prometheus collectors, per LU, built
// unregistered; the embedding program registers Collectors. A nil
// *Metrics counts nothing.
type Metrics struct {
	reconnects  *prometheus.CounterVec // lu
	replayed    *prometheus.CounterVec // lu
	unavailable *prometheus.CounterVec // lu
}

// NewMetrics builds unregistered collectors.
func NewMetrics() *Metrics {
	lu := []string{"lu"}
	return &Metrics{
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_attach_reconnects_total", Help: "Upstream connections replaced after a break, a timeout or NBD_ESHUTDOWN, by LU.",
		}, lu),
		replayed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_attach_replayed_requests_total", Help: "Unanswered requests sent again on a new upstream connection, by LU.",
		}, lu),
		unavailable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_attach_unavailable_seconds_total", Help: "Seconds without an upstream connection (requests held), by LU.",
		}, lu),
	}
}

// Collectors returns the collectors to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.reconnects, m.replayed, m.unavailable}
}

func (m *Metrics) reconnected(lu string, replayed int, without time.Duration) {
	if m == nil {
		return
	}
	m.reconnects.WithLabelValues(lu).Inc()
	m.replayed.WithLabelValues(lu).Add(float64(replayed))
	m.unavailable.WithLabelValues(lu).Add(without.Seconds())
}

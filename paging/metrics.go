package paging

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the paging service's counters, built unregistered; cmd
// registers them (Collectors). A nil *Metrics counts nothing.
type Metrics struct {
	// requests counts Request calls by result: created, existed, or the
	// refusal (invalid, exists, no_space, error).
	requests *prometheus.CounterVec
	// releases counts Release calls by result: released, busy, not_found,
	// error.
	releases *prometheus.CounterVec
}

// NewMetrics builds the counters.
func NewMetrics() *Metrics {
	return &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_paging_requests_total",
			Help: "Paging space requests this node answered, by result: created, existed, invalid, exists, error.",
		}, []string{"result"}),
		releases: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lupool_paging_releases_total",
			Help: "Paging space releases this node answered, by result: released, busy, not_found, error.",
		}, []string{"result"}),
	}
}

// Collectors are the metrics for a registry.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.releases}
}

func (m *Metrics) request(sp Space, err error) {
	if m == nil {
		return
	}
	result := "created"
	switch {
	case errors.Is(err, ErrInvalid):
		result = "invalid"
	case errors.Is(err, ErrExists):
		result = "exists"
	case err != nil:
		result = "error"
	case sp.Existed:
		result = "existed"
	}
	m.requests.WithLabelValues(result).Inc()
}

func (m *Metrics) release(err error) {
	if m == nil {
		return
	}
	result := "released"
	switch {
	case errors.Is(err, ErrBusy):
		result = "busy"
	case errors.Is(err, ErrNotFound):
		result = "not_found"
	case err != nil:
		result = "error"
	}
	m.releases.WithLabelValues(result).Inc()
}

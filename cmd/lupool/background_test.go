package main

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestLatencyMeter: the meter reports the requests and latency since its
// last call, less QoS waits, and nothing for a tick whose totals went down
// (an LU's series deleted).
func TestLatencyMeter(t *testing.T) {
	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "lupool_nbd_request_duration_seconds"}, []string{"export", "command"})
	wait := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "lupool_qos_wait_seconds_total"}, []string{"lu", "op"})
	other := prometheus.NewCounter(prometheus.CounterOpts{Name: "lupool_other_total"})
	other.Add(1000)
	m := &latencyMeter{nbd: []prometheus.Collector{dur, other}, qos: []prometheus.Collector{wait}}
	if n, d := m.since(); n != 0 || d != 0 {
		t.Fatalf("first call: %d %v", n, d)
	}
	for range 10 {
		dur.WithLabelValues("a", "write").Observe(0.002)
	}
	dur.WithLabelValues("b", "read").Observe(0.5) // 0.4 s of it waited for QoS
	wait.WithLabelValues("b", "read").Add(0.4)
	n, d := m.since()
	if n != 11 || d < 119*time.Millisecond || d > 121*time.Millisecond {
		t.Fatalf("since: %d requests, %v; want 11 and 120ms", n, d)
	}
	dur.DeleteLabelValues("b", "read")
	if n, d := m.since(); n != 0 || d != 0 {
		t.Fatalf("after a series went: %d %v", n, d)
	}
	dur.WithLabelValues("a", "write").Observe(0.001)
	if n, d := m.since(); n != 1 || d < 999*time.Microsecond || d > 1001*time.Microsecond {
		t.Fatalf("next tick: %d %v", n, d)
	}
}
